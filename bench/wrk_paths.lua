-- wrk script for bench/waf.py: a different request path on every request.
-- Arguments (after "--"): a file with one path a line; the requests take the
-- lines in turn, wrapping around at the end. wrk -t1 runs one Lua state, so
-- the turn is shared by all connections. The summary line is wrk_report.lua's.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk_report.lua")

local paths, count, position = {}, 0, 0

init = function(args)
  for line in io.lines(args[1]) do
    count = count + 1
    paths[count] = line
  end
  if count == 0 then
    error("wrk_paths.lua: no paths in " .. args[1])
  end
end

request = function()
  position = position % count + 1
  return wrk.format(nil, paths[position])
end
