-- wrk script for bench/escalation.py's attacker: every request asks for a
-- different path that the upstream does not have (404), as a scanner's
-- flood does. wrk -t1 runs one Lua state, so the numbers never repeat.
-- The summary line is wrk_report.lua's.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk_report.lua")

local n = 0

request = function()
  n = n + 1
  return wrk.format("GET", "/flood/" .. n)
end
