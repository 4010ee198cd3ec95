-- wrk script for bench/jwt.py: a different bearer token on every request.
-- Arguments (after "--"): a file with one Authorization header value a line,
-- and the line to start at (0-based); the requests take the lines in turn,
-- wrapping around at the end. wrk -t1 runs one Lua state, so the turn is
-- shared by all connections. The summary line is wrk_report.lua's.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk_report.lua")

local tokens, count, position = {}, 0, 0

init = function(args)
  for line in io.lines(args[1]) do
    count = count + 1
    tokens[count] = line
  end
  if count == 0 then
    error("wrk_tokens.lua: no tokens in " .. args[1])
  end
  position = tonumber(args[2] or "0") % count
end

request = function()
  position = position % count + 1
  wrk.headers["Authorization"] = tokens[position]
  return wrk.format()
end
