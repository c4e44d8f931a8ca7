-- The REPL's helpers (`rrengine -i`): an operator in an emergency types short calls.
-- Loaded by the REPL as globals; every helper goes through the same flow as the plans.
--   status()                 state and health of every service
--   health("sso.api")        one service's health check, now
--   restart("sso.api", {deploy_path = "/tmp/deploy/sso-api"})   the full flow, with rollback
--   rollback("sso.api")      back to the known-good definition (and undo the last deploy)
--   events(20)               the last events of the event log
--   journal("sso.api", 50)   the unit's journal lines
--   user(true)               talk to your user manager (also RRENGINE_USER=1)
local rr = require("rr")
local fs = require("rr.fs")
local proc = require("rr.proc")
local systemd = require("rr.systemd")
local services = require("rr.services")
local status = require("rr.status")
local health = require("rr.health")
local rolling = require("rr.rolling")

local env = { user = os.getenv("RRENGINE_USER") == "1",
  file = os.getenv("RRENGINE_SERVICES") or "services.lua" }

local function manager()
  if not env.manager then
    env.manager = assert((env.user and systemd.user or systemd.system)())
  end
  return env.manager
end

local function platform()
  if not env.platform then
    local p, errs = services.load(env.file)
    if not p then error(table.concat(errs, "\n"), 0) end
    env.platform = p
  end
  return env.platform
end

local function service(name)
  local svc = platform().by_name[name]
  if not svc then error(("unknown service %q"):format(tostring(name)), 0) end
  return svc
end

function _G.user(on)
  env.user = on ~= false
  env.manager = nil
  return env.user and "user manager" or "system manager"
end

function _G.services_file(path)
  env.file = path
  env.platform = nil
  return #platform().services .. " services loaded from " .. path
end

function _G.status()
  print(status.format(status.collect(manager(), platform().services)))
end

function _G.health(name)
  local svc = service(name)
  local ok, info = health.check(manager():unit(svc.unit), svc.health)
  return ok and "healthy" or "unhealthy", ok and info.detail or info
end

local function run(opts)
  opts.user = env.user
  opts.services_file = env.file
  opts.manager = manager()
  opts.ui = require("rr.ui").new({})
  local s = rolling.run(opts)
  return s.success and "ok" or ("failed (exit %d): %s"):format(s.exit_code, tostring(s.error))
end

function _G.restart(name, opts)
  opts = opts or {}
  opts.services = { service(name).name }
  opts.deploy = opts.deploy_path ~= nil
  return run(opts)
end

function _G.rollback(name)
  local r = proc.run({ arg[-1] or "rrengine", (rr.root or "") .. "plans/rollback.lua", "--service", service(name).name,
    "--services", env.file, env.user and "--user" or nil }, { on_line = function(_, line) print(line) end })
  return r and "rolled back" or "rollback failed (see above)"
end

function _G.events(n)
  local path = rolling.default_events_file(env.user)
  local text = fs.read(path)
  if not text then return "no event log at " .. path end
  local lines = {}
  for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
  for i = math.max(1, #lines - (n or 20) + 1), #lines do print(lines[i]) end
end

function _G.journal(name, n)
  local argv = { "journalctl", "--no-pager", "-n", tostring(n or 50), "-u", service(name).unit }
  if env.user then table.insert(argv, 2, "--user") end
  local res, err, r = proc.run(argv, { timeout = 10 })
  res = res or r
  if res then io.write(res.stdout, res.stderr) else return err end
end

_G.rr = rr
if fs.stat(env.file) then
  local ok, err = pcall(platform)
  print(ok and ("rrengine REPL: %d services from %s (%s manager). Try status(), health(name), restart(name), rollback(name), events(), journal(name).")
    :format(#env.platform.services, env.file, env.user and "user" or "system") or ("rrengine REPL: " .. err))
else
  print("rrengine REPL: no " .. env.file .. " here; services_file(path) loads one.")
end
return env
