-- The run's event stream: one JSON line per event in the event log (rr.log), every event
-- handed to the operator's view and to the hooks' on_event. Events are the record of what
-- the engine did; a dry run writes none.
--
-- The log line and the view happen inside emit: the log keeps the order and survives a crash
-- (a rollback is fsynced before the run goes on), the view shows what is happening now. Hooks
-- are another matter: a chat webhook may take seconds per event, and a migration's output
-- comes as one task per line (rr.proc's on_line), all emitting at once. So hooks get the
-- events through a queue that one task per stream drains: in emission order, one event at a
-- time, while the run goes on. The queue is bounded: past HOOK_QUEUE waiting events, new ones
-- are dropped for the hooks (only for them: the log has them all) and a WARNING counts them,
-- rather than the run waiting for a hook or holding every line of output in memory.
local rr = require("rr")
local log = require("rr.log")

local events = {}
events.__index = events

-- Events waiting for the on_event hooks, at most.
events.HOOK_QUEUE = 1000
-- stream:close() waits this long (seconds) for the hooks to take what is queued.
events.DRAIN_TIMEOUT = 10

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
--   service_hooks = fn(service_name) -> set|nil, drain_timeout = seconds|nil }
-- -> stream | nil, err. Without a path nothing is written (dry run, Lua API without a log).
function events.open(opts)
  local self = setmetatable({
    run = opts.run or new_run_id(),
    view = opts.view,
    hooks = opts.hooks,
    service_hooks = opts.service_hooks,
    drain_timeout = opts.drain_timeout or events.DRAIN_TIMEOUT,
    -- for the hooks: { ev, sets } items from head to tail; the task draining it; how many
    -- events did not fit since the last note
    queue = { head = 1, tail = 0 },
    drainer = nil,
    dropped = 0,
    closing = false,
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

local function queued(q)
  return q.tail - q.head + 1
end

local function pop(q)
  if q.head > q.tail then return nil end
  local item = q[q.head]
  q[q.head] = nil
  q.head = q.head + 1
  return item
end

-- The WARNING that counts the events the hooks did not get.
local function note_dropped(self, why)
  local n = self.dropped
  self.dropped = 0
  self:emit("WARNING", { dropped = n, warning = ("%d events dropped for on_event hooks (%s)"):format(n, why) })
end

-- The hooks' task: one event at a time, each to the run's hooks then the service's own.
local function drain_loop(self)
  local q = self.queue
  while true do
    local item = pop(q)
    if item then
      local ev = item[1]
      for _, set in ipairs(item[2]) do
        local ok, err = set:call("on_event", ev)
        if ok == nil then
          self:emit("HOOK_FAILED", { service = ev.service, hook = "on_event", error = err })
        end
      end
    elseif self.dropped > 0 and not self.closing then
      -- caught up: tell the hooks (and the log) what they missed, through the queue
      note_dropped(self, ("more than %d waiting"):format(events.HOOK_QUEUE))
    else
      return
    end
  end
end

local function drain(self)
  local ok, err = pcall(drain_loop, self)
  -- an emit from now on starts a new task (none was started while this one ran)
  self.drainer = nil
  if not ok then error(err, 0) end
end

-- Queue ev for the on_event hooks that want it.
local function queue_for_hooks(self, ev)
  if self.closing then return end
  local sets = {}
  -- the run's hooks see every event; a service's own hooks see that service's events
  if self.hooks and self.hooks:has("on_event") then sets[#sets + 1] = self.hooks end
  local own = ev.service and self.service_hooks and self.service_hooks(ev.service)
  if own and own:has("on_event") then sets[#sets + 1] = own end
  if #sets == 0 then return end
  local q = self.queue
  if queued(q) >= events.HOOK_QUEUE then
    self.dropped = self.dropped + 1
    return
  end
  q.tail = q.tail + 1
  q[q.tail] = { ev, sets }
  if not self.drainer then
    self.drainer = rr.spawn(drain, self)
  end
end

-- stream:emit(name, fields) -> the event table. A failing log write is reported once on
-- stderr and does not stop the run (the restart matters more than its record). Returns at
-- once: on_event hooks get the event later, from the stream's own task.
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
  if self.view then
    self.view(ev)
  end
  -- a failing hook is not told about its own failure (it would fail again, without end)
  if name ~= "HOOK_FAILED" then
    queue_for_hooks(self, ev)
  end
  return ev
end

-- Waits for the hooks' task at most timeout seconds; then cancels it.
local function wait_drained(drainer, timeout)
  local timer <close> = rr.spawn(rr.sleep, timeout)
  if rr.wait_any(drainer, timer) ~= drainer then
    drainer:cancel()
    rr.wait(drainer)
  end
end

-- stream:close(): lets the hooks take what is queued (at most drain_timeout seconds; then the
-- rest is dropped and counted in a WARNING), then syncs and closes the log. Events emitted
-- from now on go to the log (until it is closed) and the view, no longer to the hooks.
function events:close()
  self.closing = true
  local drainer = self.drainer
  local waited, werr = true, nil
  if drainer then
    -- a wait that raises (the engine exiting: os.exit in a task) still closes the log
    waited, werr = pcall(wait_drained, drainer, self.drain_timeout)
    if not waited then drainer:cancel() end
    self.drainer = nil
  end
  if self.dropped > 0 then
    note_dropped(self, ("more than %d waiting"):format(events.HOOK_QUEUE))
  end
  local left = queued(self.queue)
  if left > 0 then
    self.queue = { head = 1, tail = 0 }
    self.dropped = left
    note_dropped(self, "not delivered when the stream closed")
  end
  if self.file then
    self.file:sync()
    self.file:close()
    self.file = nil
  end
  if not waited then error(werr, 0) end
end

return events
