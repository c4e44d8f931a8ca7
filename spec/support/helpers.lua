-- spec/support/helpers.lua: small things many specs need.
--
--   local helpers = require("spec.support.helpers")
--   helpers.engine                 -- the engine binary, for child engines
--   helpers.write(path, data)      -- a file (parents created), mode 0644 unless given
--   helpers.run({ "rsync", ... })  -- a setup command that must succeed
--   helpers.mode("640")            -- 416: Lua has no octal literals
local fs = require("rr.fs")

local helpers = {}

-- The engine binary running these specs: $RR_ENGINE (run-specs sets it; under valgrind
-- /proc/self/exe would be valgrind), else /proc/self/exe, else arg[-1] (the interpreter that
-- runs busted); the first that is a file. nil when none is.
for _, p in ipairs({ os.getenv("RR_ENGINE") or false, fs.realpath("/proc/self/exe") or false,
                     arg and arg[-1] or false }) do
  if p and fs.stat(p, true) and fs.stat(p, true).type == "file" then
    helpers.engine = p
    break
  end
end


-- Octal mode literals (Lua has none): mode("640") == 416.
function helpers.mode(s)
  return tonumber(s, 8)
end

-- Writes a file atomically, its parent directories created (0755), with mode (default
-- 0644). Returns the path.
-- Replace the first match of a pattern in a file (an operator's hand edit of a unit file).
function helpers.edit(path, from, to)
  local text = assert(fs.read(path))
  local new, n = text:gsub(from, to, 1)
  assert(n == 1, "pattern not found in " .. path)
  assert(fs.write_atomic(path, new))
end

function helpers.write(path, data, mode)
  local parent = path:match("^(.*)/[^/]*$")
  if parent and parent ~= "" then assert(fs.mkdir_p(parent, 493)) end
  assert(fs.write_atomic(path, data, { mode = mode or 420 }))
  return path
end

-- Runs a setup command from an argv; fails the spec when it fails. Returns its result.
function helpers.run(argv)
  local res, err, _, r = require("rr.proc").run(argv, { capture = true })
  assert(res, ("%s: %s %s"):format(table.concat(argv, " "), tostring(err), r and r.stderr or ""))
  return res
end

-- Polls fn every 10 ms until it is true, at most `timeout` seconds (default 5): for state only
-- a poll can read (HAProxy's counters, a file). Returns whether it became true.
function helpers.eventually(fn, timeout)
  local rr = require("rr")
  local deadline = rr.now() + (timeout or 5)
  while not fn() do
    if rr.now() > deadline then return false end
    rr.sleep(0.01)
  end
  return true
end

-- The events of a platform's latest run (its log keeps earlier runs before it).
function helpers.last_run(p)
  local evs = p:events()
  local run
  for _, ev in ipairs(evs) do
    if ev.event == "PLAN_START" then run = ev.run end
  end
  local out = {}
  for _, ev in ipairs(evs) do
    if run and ev.run == run then out[#out + 1] = ev end
  end
  return out
end

-- The events named `name` (of `service`, when given) in a list of events.
function helpers.events_of(evs, name, service)
  local out = {}
  for _, ev in ipairs(evs) do
    if ev.event == name and (service == nil or ev.service == service) then out[#out + 1] = ev end
  end
  return out
end

return helpers
