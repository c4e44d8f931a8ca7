-- Hook scripts: a Lua file returning a table of functions (before_restart, after_restart,
-- on_rollback, on_event, ...). Every call runs in its own task, so a hook may use any
-- primitive; an error in a hook is returned to the caller, it never crashes the engine.
--
-- The engine is one thread: a hook that blocks it (a shell command, a read from a pipe, a CPU
-- loop) stalls every restart, health probe and signal. So a hook file is loaded within a time
-- limit, every call has a deadline that holds even for code that never waits (task:deadline),
-- and the file's globals are the engine's except for the calls that block the thread.
local rr = require("rr")
local chunk = require("rr.chunk")
local fs = require("rr.fs")

local hooks = {}
hooks.__index = hooks

local KNOWN = {
  before_restart = true, after_restart = true, on_rollback = true, on_event = true,
  on_failure = true, on_success = true, before_plan = true, after_plan = true,
}

-- Seconds a hook file may take to load (its top level).
hooks.LOAD_TIMEOUT = 10

local ALTERNATIVE = "run commands with rr.proc.run(argv), which waits without blocking the engine"
  .. " (docs/scripting.md, rr.proc)"

-- Raises for the hook's line: level 2 is the caller of the function that refuses.
local function refuse(what, why, level)
  error(("%s %s: hooks share the engine's one thread; %s"):format(what, why, ALTERNATIVE), (level or 2) + 1)
end

local function refuse_stdin(what)
  refuse(what, "would block the whole engine waiting for standard input", 3)
end

-- Raises when path is a FIFO, a socket or a device (/dev/null aside): opening a FIFO waits for
-- its other end, reading a terminal for a line. A path that does not exist is left to io.open,
-- which creates a regular file or fails by itself.
local function check_regular(fname, path)
  if type(path) ~= "string" or path == "/dev/null" then return end
  local st = fs.stat(path, true)
  if st and st.type == "other" then
    refuse(("%s(%q)"):format(fname, path),
      ("would block the whole engine (%s is a FIFO, a socket or a device, not a regular file)"):format(path), 3)
  end
end

-- os and io for hook files: the libraries themselves, minus what blocks the engine's thread.
local function guarded_os()
  local os_ = {}
  for k, v in pairs(os) do os_[k] = v end
  os_.execute = function() refuse("os.execute", "would block the whole engine until the command ends") end
  return os_
end

local function guarded_io()
  local io_ = {}
  for k, v in pairs(io) do io_[k] = v end
  io_.popen = function() refuse("io.popen", "would block the whole engine until the command ends") end
  io_.open = function(path, ...)
    check_regular("io.open", path)
    return io.open(path, ...)
  end
  io_.lines = function(path, ...)
    if path == nil and io.input() == io.stdin then refuse_stdin("io.lines()") end
    check_regular("io.lines", path)
    return io.lines(path, ...)
  end
  io_.read = function(...)
    if io.input() == io.stdin then refuse_stdin("io.read") end
    return io.read(...)
  end
  io_.input = function(file)
    check_regular("io.input", file)
    local f = io.input(file)
    return f == io.stdin and io_.stdin or f
  end
  io_.output = function(file)
    check_regular("io.output", file)
    return io.output(file)
  end
  -- io.stdin:read() and friends: any method of the stand-in raises.
  io_.stdin = setmetatable({}, {
    __index = function(_, method) return function() refuse_stdin("io.stdin:" .. tostring(method)) end end,
    __name = "FILE* (standard input, not for hooks)",
  })
  return io_
end

-- hooks.environment() -> a fresh globals table for one hook file: everything of the engine's
-- globals (require, rr modules, string, table, ...) through __index, with os.execute,
-- io.popen and blocking io (io.open of a FIFO or a device, io.read/io.lines on stdin) raising an
-- error that names rr.proc.run. Globals the file sets stay in its own table. This keeps a hook
-- from stalling the engine by mistake; it is not a sandbox against its author (debug is there).
function hooks.environment()
  local env = setmetatable({}, { __index = _G })
  local os_, io_ = guarded_os(), guarded_io()
  env.os, env.io, env._G = os_, io_, env
  env.require = function(name)
    if name == "os" then return os_ elseif name == "io" then return io_ elseif name == "_G" then return env end
    return require(name)
  end
  -- load, loadfile and dofile compile into this environment unless given another one.
  env.load = function(...)
    if select("#", ...) >= 4 then return load(...) end
    local text, name, mode = ...
    return load(text, name, mode, env)
  end
  env.loadfile = function(...)
    if select("#", ...) >= 3 then return loadfile(...) end
    local path, mode = ...
    if path == nil then refuse_stdin("reading a chunk from standard input") end
    check_regular("loadfile", path)
    return loadfile(path, mode, env)
  end
  env.dofile = function(path)
    if path == nil then refuse_stdin("reading a chunk from standard input") end
    check_regular("dofile", path)
    return assert(loadfile(path, "bt", env))()
  end
  return env
end

-- hooks.load(path) -> hook script | nil, err, CODE
-- The file runs in hooks.environment(), within hooks.LOAD_TIMEOUT seconds.
function hooks.load(path)
  local ok, t, code = chunk.load(path, { env = hooks.environment(), seconds = hooks.LOAD_TIMEOUT })
  if not ok then
    if code == "ETIMEDOUT" then
      return nil, "hook script " .. t, code
    elseif code == "ERAISED" then
      return nil, ("hook script %s failed to load: %s"):format(path, tostring(t)), code
    end
    return nil, ("hook script %s: %s"):format(path, tostring(t)), code
  end
  if type(t) ~= "table" then
    return nil, ("hook script %s must return a table of functions, got %s"):format(path, type(t)), "EINVAL"
  end
  for name, fn in pairs(t) do
    if not KNOWN[name] then
      return nil, ("hook script %s: unknown hook %q"):format(path, tostring(name)), "EINVAL"
    end
    if type(fn) ~= "function" then
      return nil, ("hook script %s: hook %q is a %s, not a function"):format(path, name, type(fn)), "EINVAL"
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

-- A hook that takes longer than this is stopped and counts as failed: a hung chat webhook
-- must not hold a rollback, nor a CPU loop the whole engine.
hooks.TIMEOUT = 30

function set:call(name, ...)
  for _, h in ipairs(self.list) do
    local fn = h.fns[name]
    if fn then
      local timeout = self.timeout or hooks.TIMEOUT
      -- <close>: a caller cancelled while it waits takes the hook down with it.
      local task <close> = rr.spawn(fn, ...)
      task:deadline(timeout)
      local ok, r1, r2 = rr.wait(task)
      if not ok then
        -- one line for the operator; the traceback stays available to whoever wants it
        local full = tostring(r1)
        local first = r2 == "ETIMEDOUT" and ("timed out after %gs"):format(timeout) or full:match("^[^\n]*")
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
