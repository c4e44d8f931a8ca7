-- rrengine demo/events.lua FILE [RUN]: the events of one run of an event log (default: the
-- last run in FILE), one short line each: time, event, service, and what it says.
-- An example of reading the JSONL event log from a script (no jq needed: cjson ships with
-- the engine's dependencies).
local cjson = require("cjson")

local file, want = ...
if not file then
  io.stderr:write("usage: rrengine demo/events.lua FILE [RUN]\n")
  os.exit(2)
end

local all = {}
local f, err = io.open(file, "r")
if not f then
  io.stderr:write("events.lua: ", err, "\n")
  os.exit(1)
end
for line in f:lines() do
  local ok, ev = pcall(cjson.decode, line)
  if ok and type(ev) == "table" then all[#all + 1] = ev end
end
f:close()

if not want then
  for _, ev in ipairs(all) do
    if ev.event == "PLAN_START" then want = ev.run end
  end
end

-- The one field worth reading for an event, in order of interest.
local function detail(ev)
  local function s(v)
    if type(v) == "table" then
      local parts = {}
      for i, x in ipairs(v) do parts[i] = tostring(x) end
      return table.concat(parts, ", ")
    end
    return tostring(v)
  end
  if ev.event == "PLAN_START" then return "order: " .. s(ev.order) end
  if ev.event == "PLAN_END" then return ("%s, exit code %s"):format(s(ev.result), s(ev.exit_code)) end
  if ev.event == "DEFINITION_CHANGED" then return s(ev.changes) end
  if ev.event == "DEFINITION_RESTORED" then
    local what = {}
    for _, p in ipairs(ev.restored or {}) do what[#what + 1] = "put back " .. p end
    for _, p in ipairs(ev.removed or {}) do what[#what + 1] = "removed " .. p end
    return #what > 0 and table.concat(what, "; ") or "nothing differed"
  end
  if ev.event == "DEPLOY_END" then
    return ("%s new, %s replaced file(s)"):format(s(ev.created or 0), s(ev.replaced or 0))
  end
  if ev.event == "HEALTH_CHECK_PASSED" then return ev.phase .. ": " .. s(ev.detail) end
  if ev.event == "HEALTH_CHECK_FAILED" then return ev.phase .. ": " .. s(ev.error) end
  for _, k in ipairs({ "error", "reason", "note", "warning", "line", "method", "command" }) do
    if ev[k] ~= nil and ev[k] ~= cjson.null then return s(ev[k]) end
  end
  return ""
end

local n = 0
for _, ev in ipairs(all) do
  if ev.run == want then
    n = n + 1
    local time = tostring(ev.ts or ""):sub(12, 23)
    local text = ("  %s  %-22s %-14s %s"):format(time, ev.event, ev.service or "", detail(ev))
    io.write(text:gsub("%s+$", ""), "\n")
  end
end
if n == 0 then
  io.stderr:write("events.lua: no events for run ", tostring(want), " in ", file, "\n")
  os.exit(1)
end
