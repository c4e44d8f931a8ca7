-- rr: the library a plan requires. Tasks and time come from the C core (rr.loop); the
-- primitives are their own modules (rr.systemd, rr.http, rr.proc, rr.log, rr.fs).
--
-- On top of the loop, two helpers give every caller the same failure form and structured
-- concurrency: rr.join (one task's outcome as `true, results...` or `nil, message, CODE`) and
-- rr.race (children that never outlive their caller).
local loop = require("rr.loop")

local rr = {}

rr.spawn = loop.spawn

-- rr.wait(task) -> ok, results... | rr.wait{t1, t2, ...} -> { table.pack(ok, ...), ... }: one
-- shape per form, whatever the number of tasks (several tasks are always a list).
function rr.wait(...)
  if select("#", ...) > 1 then
    error("rr.wait: give several tasks as a list: rr.wait{t1, t2, ...}", 2)
  end
  return loop.wait(...)
end
rr.wait_any = loop.wait_any
rr.sleep = loop.sleep
rr.now = loop.now
rr.current = loop.current
rr.on_signal = loop.on_signal
rr.off_signal = loop.off_signal
rr.interrupts = loop.interrupts

-- The code of a finished task that did not return normally, from its status (never from the
-- text of its error): "ECANCELED" (task:cancel(), shutdown, os.exit in a task), "ETIMEDOUT"
-- (its time bound passed), "EFAILED" (it raised an error).
local function failure_code(task, err)
  if task:status() == "canceled" then return "ECANCELED" end
  if type(err) == "table" and err.code then return err.code end
  return "EFAILED"
end
rr.failure_code = failure_code

-- Is err (an error caught by pcall) the unwinding of a cancelled task? The loop raises the
-- plain string "canceled" (or "exiting ..." during os.exit from a task); both end the task.
function rr.is_cancel(err)
  if type(err) == "table" then return err.code == "ECANCELED" end
  local text = tostring(err)
  return text == "canceled" or text:match("canceled$") ~= nil or text:match("canceled\nstack traceback") ~= nil
    or text:find("exiting (os.exit(", 1, true) ~= nil
end

-- rr.join(task) -> true, results... | nil, message, CODE
-- Waits for one task. A raised error's message is its first line (the traceback is in the
-- fourth value); CODE is "ECANCELED", "ETIMEDOUT" or "EFAILED".
function rr.join(task)
  local r = table.pack(loop.wait(task))
  if r[1] then return table.unpack(r, 1, r.n) end
  local full = r[2]
  -- a task ended by its time or instruction bound says so in a third value
  local code = type(r[3]) == "string" and r[3] or failure_code(task, full)
  local text = type(full) == "table" and tostring(full.message) or tostring(full)
  return nil, (text:match("^[^\n]*")), code, text
end

-- A set of child tasks closed with the scope that holds it: leaving the scope (a return, an
-- error, the caller's own cancellation) cancels every child still running.
local Children = {}
Children.__index = Children
Children.__close = function(self)
  for _, t in ipairs(self) do
    local s = t:status()
    if s ~= "done" and s ~= "failed" and s ~= "canceled" then t:cancel() end
  end
end

-- rr.children() -> a to-be-closed list of tasks: `local kids <close> = rr.children()`,
-- `kids:spawn(fn, ...)`.
function rr.children()
  return setmetatable({}, Children)
end

function Children:spawn(fn, ...)
  local t = loop.spawn(fn, ...)
  self[#self + 1] = t
  return t
end

-- Cancels the children still running and waits until every one has ended, so nothing of theirs
-- runs after the caller goes on.
function Children:close_all()
  Children.__close(self)
  if #self > 0 then loop.wait(self) end
end

-- rr.race(fns[, timeout]) -> i, results... | nil, message, CODE
-- Runs each function of the list as a child task; the first to finish wins, the others are
-- cancelled and waited for before rr.race returns. The winner's index and return values; when
-- the winner raised, `nil, message, CODE` as rr.join; after `timeout` seconds without a winner,
-- `nil, "timed out after Ns", "ETIMEDOUT"`. Cancelling the caller cancels every child.
function rr.race(fns, timeout)
  if type(fns) ~= "table" or #fns == 0 then error("rr.race: a non-empty list of functions", 2) end
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout or timeout < 0) then
    error("rr.race: timeout must be a number of seconds >= 0", 2)
  end
  local kids <close> = rr.children()
  for i, fn in ipairs(fns) do
    if type(fn) ~= "function" then error(("rr.race: fns[%d] is not a function"):format(i), 2) end
    kids:spawn(fn)
  end
  local timer
  if timeout then timer = kids:spawn(loop.sleep, timeout) end
  local r = table.pack(loop.wait_any(kids))
  local winner = r[1]
  kids:close_all()
  if winner == timer then
    return nil, ("timed out after %gs"):format(timeout), "ETIMEDOUT"
  end
  local index
  for i, t in ipairs(kids) do if t == winner then index = i break end end
  if not r[2] then
    local full = r[3]
    local text = type(full) == "table" and tostring(full.message) or tostring(full)
    local code = type(r[4]) == "string" and r[4] or failure_code(winner, full)
    return nil, (text:match("^[^\n]*")), code, text
  end
  return index, table.unpack(r, 3, r.n)
end

-- rr.with_timeout(seconds, fn, ...) -> true, results... | nil, message, CODE
-- fn(...) in a child task bounded by `seconds` ("ETIMEDOUT" after it, the child cancelled).
function rr.with_timeout(seconds, fn, ...)
  local args = table.pack(...)
  local r = table.pack(rr.race({ function() return fn(table.unpack(args, 1, args.n)) end }, seconds))
  if r[1] == nil then return nil, r[2], r[3], r[4] end
  return true, table.unpack(r, 2, r.n)
end

-- rr.rolling_restart{ services = {"sso.api"}, services_file = "services.lua", user = true, ... }
-- -> summary { success, exit_code, services_succeeded, services_failed, services_rolled_back,
-- services_skipped, duration_ms, ... } (see lua/rr/rolling.lua for every option).
function rr.rolling_restart(opts)
  return require("rr.rolling").run(opts or {})
end

return rr
