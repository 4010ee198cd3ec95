-- wrk script: a different line of a file on every request, as the request's
-- path or as the value of one header.
-- Arguments (after "--"): the file (one value a line), the line to start at
-- (0-based), and "path" or the header's name (e.g. Authorization). The
-- requests take the lines in turn, wrapping around at the end. wrk -t1 runs
-- one Lua state, so the turn is shared by all connections. The summary line
-- is wrk_report.lua's. Used by bench/jwt.py (tokens) and bench/waf.py (paths).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk_report.lua")

local lines, count, position, target = {}, 0, 0, "path"

init = function(args)
  for line in io.lines(args[1]) do
    count = count + 1
    lines[count] = line
  end
  if count == 0 then
    error("wrk_lines.lua: no lines in " .. args[1])
  end
  position = tonumber(args[2] or "0") % count
  target = args[3] or "path"
end

request = function()
  position = position % count + 1
  if target == "path" then
    return wrk.format(nil, lines[position])
  end
  wrk.headers[target] = lines[position]
  return wrk.format()
end
