-- rr.chunk: runs Lua files that the engine loads (hook scripts, the services file) within
-- bounds, so that one with an endless loop, or one that waits forever, fails with a message
-- instead of hanging the engine before anything started.
--
-- The code runs as a task with a deadline (task:deadline) and an instruction limit
-- (task:max_instructions): both hold also for code that never waits, since the engine checks them
-- from a count hook. What no hook can interrupt is a single C call that never returns to Lua:
-- string.find/match/gsub with a pattern that backtracks exponentially (Lua's matcher limits only
-- its recursion depth, "pattern too complex", not its time), or string.rep of gigabytes. Such a
-- call is bounded by nothing but the operator's kill -9; everything between two C calls is.
local loop = require("rr.loop")
local fs = require("rr.fs")

local chunk = {}

-- The part of a task's error before the traceback rr.wait() appends to a string error.
local function without_traceback(err)
  if type(err) ~= "string" then return err end
  return err:match("^(.-)\nstack traceback:\n") or err
end

-- chunk.run(fn, opts) -> true, results... | nil, err, CODE, traceback
-- Runs fn() as a task bounded by opts.seconds (wall clock, waits included) and
-- opts.instructions (Lua VM instructions), either optional; opts.name names it in messages
-- (a file's path). Failures:
--   nil, "NAME did not finish loading within N s", "ETIMEDOUT"
--   nil, "FILE:LINE: runs more than N instructions (an endless loop?)", "ELIMIT"
--   nil, the error fn raised (a string without its traceback, or the value), "ERAISED", traceback
-- An interrupt (SIGINT/SIGTERM/SIGHUP with no Lua handler) raises "interrupted" as every wait does.
function chunk.run(fn, opts)
  opts = opts or {}
  if type(fn) ~= "function" then
    error("rr.chunk.run: fn must be a function, got " .. type(fn), 2)
  end
  local task <close> = loop.spawn(fn)
  if opts.seconds then task:deadline(opts.seconds) end
  if opts.instructions then task:max_instructions(opts.instructions) end
  local r = table.pack(loop.wait(task))
  if r[1] then return true, table.unpack(r, 2, r.n) end
  local err, code = r[2], r[3]
  if code == "ETIMEDOUT" and opts.seconds then
    return nil, ("%s did not finish loading within %g s"):format(opts.name or "chunk", opts.seconds), code
  elseif code == "ELIMIT" then
    return nil, without_traceback(err), code
  end
  return nil, without_traceback(err), "ERAISED", type(err) == "string" and err or nil
end

-- chunk.load(path, opts) -> true, results... | nil, err, CODE
-- Reads the Lua text file at path (a regular file only: opening a FIFO or a device could block
-- the engine), compiles it in opts.env (default: the engine's globals) and runs it as
-- chunk.run does (opts.seconds, opts.instructions; opts.name defaults to path). As lua's
-- loadfile, a UTF-8 BOM and a first "#" line are skipped. Failures, besides chunk.run's:
--   nil, "cannot read PATH: reason", errno code (ENOENT, EACCES, ...)
--   nil, "cannot read PATH: not a regular file (a FIFO, a socket or a device)", "EINVAL"
--   nil, "PATH:LINE: syntax message", "ESYNTAX"
function chunk.load(path, opts)
  opts = opts or {}
  if type(path) ~= "string" then
    error("rr.chunk.load: path must be a string, got " .. type(path), 2)
  end
  local st, serr, scode = fs.stat(path, true)
  if not st then
    return nil, ("cannot read %s: %s"):format(path, (tostring(serr):match(": ([^:]*)$") or serr)), scode
  end
  if st.type ~= "file" then
    return nil, ("cannot read %s: not a regular file (%s)"):format(path,
      st.type == "dir" and "a directory" or "a FIFO, a socket or a device"), "EINVAL"
  end
  local source, rerr, rcode = fs.read(path)
  if not source then
    return nil, ("cannot read %s: %s"):format(path, (tostring(rerr):match(": ([^:]*)$") or rerr)), rcode
  end
  -- As loadfile: keep line numbers right.
  source = source:gsub("^\239\187\191", "")
  if source:sub(1, 1) == "#" then source = source:gsub("^[^\n]*", "") end
  -- Text only: a precompiled chunk could crash the interpreter.
  local fn, syntax_err = load(source, "@" .. path, "t", opts.env or _G)
  if not fn then return nil, syntax_err, "ESYNTAX" end
  return chunk.run(fn, { seconds = opts.seconds, instructions = opts.instructions, name = opts.name or path })
end

return chunk
