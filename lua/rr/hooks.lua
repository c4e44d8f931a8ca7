-- Hook scripts: a Lua file returning a table of functions (before_restart, after_restart,
-- on_rollback, on_event, ...). Every call runs in its own task, so a hook may use any
-- primitive; an error in a hook is returned to the caller, it never crashes the engine.
local rr = require("rr")

local hooks = {}
hooks.__index = hooks

local KNOWN = {
  before_restart = true, after_restart = true, on_rollback = true, on_event = true,
  on_failure = true, on_success = true, before_plan = true, after_plan = true,
}

-- hooks.load(path) -> hook table | nil, err
function hooks.load(path)
  local chunk, err = loadfile(path, "t")
  if not chunk then
    return nil, ("hook script %s: %s"):format(path, err)
  end
  local ok, t = pcall(chunk)
  if not ok then
    return nil, ("hook script %s failed to load: %s"):format(path, tostring(t))
  end
  if type(t) ~= "table" then
    return nil, ("hook script %s must return a table of functions, got %s"):format(path, type(t))
  end
  for name, fn in pairs(t) do
    if not KNOWN[name] then
      return nil, ("hook script %s: unknown hook %q"):format(path, tostring(name))
    end
    if type(fn) ~= "function" then
      return nil, ("hook script %s: hook %q is a %s, not a function"):format(path, name, type(fn))
    end
  end
  return setmetatable({ path = path, fns = t }, hooks)
end

-- A set of hook scripts called in order. set:call(name, ...) -> true | false, reason |
-- nil, err, traceback (false: a veto from before_restart or before_plan; nil: a hook raised
-- an error or timed out).
local set = {}
set.__index = set

function hooks.set(list)
  return setmetatable({ list = list or {} }, set)
end

function set:add(h)
  self.list[#self.list + 1] = h
end

function set:has(name)
  for _, h in ipairs(self.list) do
    if h.fns[name] then return true end
  end
  return false
end

-- A hook that takes longer than this is cancelled and counts as failed: a hung chat webhook
-- must not hold a rollback.
hooks.TIMEOUT = 30

function set:call(name, ...)
  for _, h in ipairs(self.list) do
    local fn = h.fns[name]
    if fn then
      local task = rr.spawn(fn, ...)
      local timed_out = false
      local timeout = self.timeout or hooks.TIMEOUT
      local timer = rr.spawn(function()
        rr.sleep(timeout)
        timed_out = true
        task:cancel()
      end)
      local ok, r1, r2 = rr.wait(task)
      timer:cancel()
      rr.wait(timer)
      if not ok then
        -- one line for the operator; the traceback stays available to whoever wants it
        local full = tostring(r1)
        local first = timed_out and ("timed out after %gs"):format(timeout) or full:match("^[^\n]*")
        return nil, ("hook %s in %s failed: %s"):format(name, h.path, first), full
      end
      if r1 == false then
        return false, r2 and tostring(r2) or ("vetoed by %s"):format(h.path)
      end
    end
  end
  return true
end

return hooks
