-- Status of every service: unit state and health, one look each, all at once.
local rr = require("rr")
local health = require("rr.health")

local status = {}

-- status.collect(manager, services) -> list of { name, unit, active, sub, pid, restarts, health, detail }
function status.collect(manager, list)
  local tasks = {}
  for i, svc in ipairs(list) do
    tasks[i] = rr.spawn(function()
      local unit, err = manager:unit(svc.unit)
      local props
      if unit then
        props, err = unit:properties()
      end
      if not props then
        return { name = svc.name, unit = svc.unit, active = "?", sub = "?", health = "unknown", detail = err }
      end
      local kind, detail = health.snapshot(unit, svc.health)
      return { name = svc.name, unit = svc.unit, active = props.ActiveState, sub = props.SubState,
        pid = props.MainPID, restarts = props.NRestarts, health = kind, detail = detail,
        load = props.LoadState, stale = props.NeedDaemonReload }
    end)
  end
  local rows = {}
  for i, r in ipairs(rr.wait(tasks)) do
    rows[i] = r[1] and r[2] or { name = list[i].name, unit = list[i].unit, active = "?", sub = "?",
      health = "unknown", detail = tostring(r[2]) }
  end
  return rows
end

function status.format(rows)
  local lines = { ("%-24s %-36s %-10s %-10s %8s  %s"):format("SERVICE", "UNIT", "STATE", "SUB", "PID", "HEALTH") }
  for _, r in ipairs(rows) do
    lines[#lines + 1] = ("%-24s %-36s %-10s %-10s %8s  %s (%s)%s"):format(r.name, r.unit, r.active, r.sub,
      tostring(r.pid or "-"), r.health, tostring(r.detail), r.stale and "  [unit file changed on disk]" or "")
  end
  return table.concat(lines, "\n")
end

return status
