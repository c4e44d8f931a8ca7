-- The run's event stream: one JSON line per event in the event log (rr.log), every event
-- handed to the hooks' on_event and to the operator's view. Events are the record of what
-- the engine did; a dry run writes none.
local log = require("rr.log")

local events = {}
events.__index = events

-- Events after which the log is fsynced: losing them in a crash would hide a rollback.
local SYNC_AFTER = {
  ROLLBACK_START = true, ROLLBACK_SUCCESS = true, ROLLBACK_FAILED = true, PLAN_END = true,
}

local function new_run_id()
  local f = io.open("/proc/sys/kernel/random/uuid", "r")
  local id = f and f:read("l")
  if f then f:close() end
  return id or ("%x-%x"):format(os.time(), math.random(0, 0xffffff))
end

-- events.open{ path = FILE|nil, journal = bool, run = id|nil, view = fn(ev)|nil, hooks = set|nil,
--   service_hooks = fn(service_name) -> set|nil }
-- -> stream | nil, err. Without a path nothing is written (dry run, Lua API without a log).
function events.open(opts)
  local self = setmetatable({
    run = opts.run or new_run_id(),
    view = opts.view,
    hooks = opts.hooks,
    service_hooks = opts.service_hooks,
    list = {},
    keep = opts.keep ~= false,
  }, events)
  if opts.path then
    local file, err = log.open(opts.path, { journal = opts.journal })
    if not file then
      return nil, ("cannot open the event log %s: %s"):format(opts.path, err)
    end
    self.file = file
    self.path = opts.path
  end
  return self
end

-- stream:emit(name, fields) -> the event table. A failing log write is reported once on
-- stderr and does not stop the run (the restart matters more than its record).
function events:emit(name, fields)
  local ev = { event = name, run = self.run, ts = log.timestamp() }
  for k, v in pairs(fields or {}) do
    ev[k] = v
  end
  if self.file then
    local ok, err = self.file:emit(ev)
    if not ok and not self.write_failed then
      self.write_failed = true
      io.stderr:write(("rrengine: cannot write to the event log %s: %s\n"):format(self.path, err))
    end
    if SYNC_AFTER[name] then
      self.file:sync()
    end
  end
  if self.keep then
    self.list[#self.list + 1] = ev
  end
  if self.view then
    self.view(ev)
  end
  if name ~= "HOOK_FAILED" then
    -- the run's hooks see every event; a service's own hooks see that service's events
    local sets = { self.hooks, ev.service and self.service_hooks and self.service_hooks(ev.service) or nil }
    for i = 1, 2 do
      local set = sets[i]
      if set and set:has("on_event") then
        local ok, err = set:call("on_event", ev)
        if ok == nil then
          self:emit("HOOK_FAILED", { service = ev.service, hook = "on_event", error = err })
        end
      end
    end
  end
  return ev
end

function events:close()
  if self.file then
    self.file:sync()
    self.file:close()
    self.file = nil
  end
end

return events
