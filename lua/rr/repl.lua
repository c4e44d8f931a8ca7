-- The REPL's helpers (`rrengine -i [--user] [--services FILE]`): an operator in an emergency
-- types short calls. main.c calls repl.start(args) with the arguments after -i; the helpers
-- become globals, and every one goes through the same code as the plans.
--   status()                 state and health of every service (a killed run first)
--   recover([opts])          resolve a killed run, as plans/rolling.lua --recover
--   health("sso.api")        one service's health check, now
--   restart("sso.api", {deploy_path = "/tmp/deploy/sso-api"})   the full flow, with rollback
--   rollback("sso.api")      back to the known-good definition (and undo the last deploy;
--                            {deploy_record = DIR} names the deploy, {no_code = true} leaves the code)
--   events(20)               the last events of the event log
--   journal("sso.api", 50)   the unit's journal lines
--   user(true)               talk to your user manager (also --user, RRENGINE_USER=1)
--   services_file(path)      load another services file (also --services, RRENGINE_SERVICES)
-- Signals: Ctrl-C cancels the running line. restart() hands it to the run, as the plan does: the
-- service in flight finishes (or rolls back) and no other one starts. rollback() always
-- finishes: a restore stopped half-way leaves the service down.
local rr = require("rr")
local cli = require("rr.cli")
local fs = require("rr.fs")
local proc = require("rr.proc")
local systemd = require("rr.systemd")
local services = require("rr.services")
local status = require("rr.status")
local health = require("rr.health")
local rolling = require("rr.rolling")
local rollback = require("rr.rollback")

local repl = {}

repl.spec = {
  usage = "rrengine -i [--user] [--services FILE]",
  summary = "The emergency REPL: a Lua prompt with the services loaded and status(), health(name), "
    .. "restart(name), rollback(name), events(n), journal(name, n). Engine options (-e, --debug) go before -i.",
  options = {
    { name = "user", help = "talk to your user service manager, as systemctl --user (default: RRENGINE_USER=1)" },
    { name = "services", key = "services_file", type = "string", value = "FILE",
      help = "the services file (default: $RRENGINE_SERVICES, else ./services.lua)" },
  },
}

-- The REPL's settings: the manager to talk to and the services file (repl.start fills them).
local env = { user = false, file = "services.lua" }
repl.env = env

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

local function ms_text(ms)
  return ms < 1000 and ("%d ms"):format(ms) or ("%.1f s"):format(ms / 1000)
end

local helpers = {}
repl.helpers = helpers

function helpers.user(on)
  env.user = on ~= false
  env.manager = nil
  return env.user and "user manager" or "system manager"
end

function helpers.services_file(path)
  env.file = path
  env.platform = nil
  return #platform().services .. " services loaded from " .. path
end

function helpers.status()
  -- a run that was killed mid-way comes first: its services may be half done
  local journal = require("rr.journal")
  local dead = journal.interrupted(require("rr.state").root(env.user))
  if dead then
    for _, line in ipairs(journal.describe(dead)) do print("!! " .. line) end
    print("!! recover() resolves it (or recover({ abandon = true }) once fixed by hand)")
  end
  print(status.format(status.collect(manager(), platform().services)))
end

-- recover([{resume = true} | {abandon = true}]) -> text: as plans/rolling.lua --recover
-- (--resume, --abandon) on the REPL's manager.
function helpers.recover(opts)
  opts = opts or {}
  local s = rolling.run({ recover = not opts.abandon, resume = opts.resume, abandon = opts.abandon,
    user = env.user, services_file = env.file, manager = manager(), ui = require("rr.ui").new({}) })
  local text = s.message or ""
  if s.exit_code ~= 0 then
    text = text .. (text ~= "" and "\n" or "") .. ("exit %d: %s"):format(s.exit_code, tostring(s.error))
  end
  return text
end

function helpers.health(name)
  local svc = service(name)
  local unit, err = manager():unit(svc.unit)
  if not unit then return "unhealthy", err end
  local ok, info = health.check(unit, svc.health)
  return ok and "healthy" or "unhealthy", ok and info.detail or info
end

-- restart(name[, opts]) -> "ok: NAME restarted (T)" | "failed (exit N): ...". opts: deploy_path,
-- force, skip_migrations, hook_files, accept_unknown_definition (as rr.rolling_restart).
function helpers.restart(name, opts)
  opts = opts or {}
  opts.services = { service(name).name }
  opts.deploy = opts.deploy_path ~= nil
  opts.user = env.user
  opts.services_file = env.file
  opts.manager = manager()
  opts.ui = require("rr.ui").new({})
  local s = rolling.run(opts)
  if s.success then
    return ("ok: %s restarted (%s)"):format(table.concat(s.services_succeeded, ", "), ms_text(s.duration_ms))
  end
  local text = ("failed (exit %d): %s"):format(s.exit_code, tostring(s.error))
  if #s.services_rollback_failed > 0 then
    text = text .. "; ROLLBACK FAILED: " .. table.concat(s.services_rollback_failed, ", ") .. " (manual steps above)"
  elseif #s.services_rolled_back > 0 then
    text = text .. "; rolled back: " .. table.concat(s.services_rolled_back, ", ")
  end
  return text
end

-- rollback(name[, {deploy_record = DIR, no_code = true, force = true}]) -> "rolled back: NAME (T)" |
-- "rollback of NAME FAILED: ..." | "rollback of NAME not started: ...". In this process, what
-- plans/rollback.lua does, through the same rr.rollback.run: under the run lock, the known-good
-- definition restored and a deploy undone (the one deploy_record names, else an unfinished one,
-- .inflight, else the last successful one, .last; one already undone is left alone), through
-- flow.rollback, its events logged and shown.
function helpers.rollback(name, opts)
  opts = opts or {}
  local svc = service(name)
  if opts.deploy_record and opts.no_code then
    error("deploy_record and no_code contradict each other (undo that deploy, or leave the code)", 0)
  end
  local call = ("rollback(%q, {%%s})"):format(svc.name)
  local args = { svc = svc, platform = platform(), user = env.user, manager = manager(),
    deploy_record = opts.deploy_record, no_code = opts.no_code, force = opts.force,
    reason = "manual rollback (REPL)", view = require("rr.ui").new({}),
    spell = { no_code = call:format("no_code = true"), deploy_record = call:format("deploy_record = DIR"),
      named = "deploy_record" } }

  -- A restore stopped half-way leaves the service stopped or with a mixed definition: a
  -- signal is noted, and the rollback goes on to its end.
  local function on_signal(sig)
    io.stderr:write(("rrengine: %s: the rollback of %s goes on to its end\n"):format(sig, svc.name))
  end
  rr.on_signal(on_signal)
  local t0 = rr.now()
  local done, code, msg, why = pcall(rollback.run, args)
  rr.off_signal(on_signal)
  if not done then error(code, 0) end
  if code == 0 then
    return ("rolled back: %s (%s)"):format(svc.name, ms_text(math.floor((rr.now() - t0) * 1000 + 0.5)))
  elseif code == 3 then
    return ("rollback of %s FAILED: %s (manual steps above)"):format(svc.name, tostring(msg))
  elseif why == "ENOTHING" then
    -- the lines above said what about the code; the REPL's words for the outcome are shorter
    msg = "nothing to restore (no known-good snapshot of its definition, no deploy to undo); "
      .. "the service was not touched"
  end
  return ("rollback of %s not started: %s"):format(svc.name, tostring(msg))
end

function helpers.events(n)
  local path = rolling.default_events_file(env.user)
  local text = fs.read(path)
  if not text then return "no event log at " .. path end
  local lines = {}
  for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
  for i = math.max(1, #lines - (n or 20) + 1), #lines do print(lines[i]) end
end

function helpers.journal(name, n)
  local argv = { "journalctl", "--no-pager", "-n", tostring(n or 50), "-u", service(name).unit }
  if env.user then table.insert(argv, 2, "--user") end
  local res, err, r = proc.run(argv, { timeout = 10 })
  res = res or r
  if res then io.write(res.stdout, res.stderr) else return err end
end

local function usage_error(msg)
  io.stderr:write("rrengine -i: ", msg, " (see rrengine --help)\n")
  os.exit(2)
end

-- repl.start(args): the REPL's options (the arguments after -i), the helpers as globals, the
-- services file loaded. A usage error exits 2 before the prompt. (`rrengine -i --help` is the
-- engine's --help, which lists these options.)
function repl.start(args)
  local opts, err = cli.parse(args or {}, repl.spec)
  if not opts then usage_error(err) end
  if opts.args[1] then
    usage_error(("unexpected argument %q (engine options and the script go before -i)"):format(opts.args[1]))
  end
  env.user = opts.user or os.getenv("RRENGINE_USER") == "1"
  env.file = opts.services_file or os.getenv("RRENGINE_SERVICES") or "services.lua"
  env.manager, env.platform = nil, nil
  for name, fn in pairs(helpers) do _G[name] = fn end
  _G.rr = rr

  if fs.stat(env.file) then
    local ok, perr = pcall(platform)
    print(ok and ("rrengine REPL: %d services from %s (%s manager). Try status(), health(name), restart(name), rollback(name), recover(), events(), journal(name).")
      :format(#env.platform.services, env.file, env.user and "user" or "system") or ("rrengine REPL: " .. perr))
  else
    print("rrengine REPL: no " .. env.file .. " here; services_file(path) loads one.")
  end
end

return repl
