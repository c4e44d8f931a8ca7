-- The REPL's helpers (`rrengine -i [--user] [--services FILE]`): an operator in an emergency
-- types short calls. main.c calls repl.start(args) with the arguments after -i; the helpers
-- become globals, and every one goes through the same code as the plans.
--   status()                 state and health of every service
--   health("sso.api")        one service's health check, now
--   restart("sso.api", {deploy_path = "/tmp/deploy/sso-api"})   the full flow, with rollback
--   rollback("sso.api")      back to the known-good definition (and undo the last deploy)
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
  print(status.format(status.collect(manager(), platform().services)))
end

function helpers.health(name)
  local svc = service(name)
  local ok, info = health.check(manager():unit(svc.unit), svc.health)
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

-- rollback(name[, {no_code = true, force = true}]) -> "rolled back: NAME (T)" | "rollback of NAME
-- FAILED: ..." | "rollback of NAME not started: ...". In this process, what plans/rollback.lua
-- does: under the run lock, the known-good definition restored and the deploy undone that the
-- plan would undo (an unfinished one, .inflight, else the last successful one, .last; one
-- already undone is left alone), through flow.rollback, its events logged and shown.
function helpers.rollback(name, opts)
  opts = opts or {}
  local svc = service(name)
  local flow = require("rr.flow")
  local deploy = require("rr.deploy")
  local events = require("rr.events")
  local snapshot = require("rr.snapshot")
  local function not_started(fmt, ...)
    return ("rollback of %s not started: " .. fmt):format(svc.name, ...)
  end
  local m = manager()
  local state_root = rolling.state_root(env.user)
  local ok, mkerr = fs.mkdir_p(state_root, 448)
  if not ok then return not_started("cannot create %s: %s", state_root, tostring(mkerr)) end
  local lock_path = state_root .. "/run.lock"
  local lock <close>, lerr = fs.lock(lock_path)
  if not lock then return not_started("another rrengine run holds the lock (%s): %s", lock_path, tostring(lerr)) end

  local record, record_dir, pointer_kind
  if not opts.no_code then
    for _, kind in ipairs({ "inflight", "last" }) do
      local dir, perr, code = deploy.read_pointer(state_root, svc.name, kind)
      if dir then
        record_dir, pointer_kind = dir, kind
        break
      elseif code ~= "ENOENT" then
        return not_started("cannot read the deploy pointer %s (%s); rollback(%q, {no_code = true}) leaves the code",
          deploy.pointer(state_root, svc.name, kind), tostring(perr), svc.name)
      end
    end
  end
  if record_dir then
    local derr
    record, derr = deploy.load(record_dir)
    if not record then
      return not_started("cannot read the deploy record %s: %s; rollback(%q, {no_code = true}) leaves the code",
        record_dir, tostring(derr), svc.name)
    end
  end
  local undo = record and record.state ~= "undone" and record or nil
  if not undo and not snapshot.known_good(state_root, svc.name) then
    return not_started("nothing to restore (no known-good snapshot of its definition, no deploy to undo); "
      .. "the service was not touched")
  end
  -- The pointers that name the record: removed once it is undone, as the plan does.
  local clear = {}
  if record then
    local want = fs.realpath(record_dir) or record_dir
    for _, kind in ipairs({ "inflight", "last" }) do
      local dir = deploy.read_pointer(state_root, svc.name, kind)
      if kind == pointer_kind or (dir and (fs.realpath(dir) or dir) == want) then clear[#clear + 1] = kind end
    end
  end

  local view = require("rr.ui").new({})
  if record and not undo then
    view:line(("deploy record %s: already undone; the code is left as it is"):format(record_dir))
  elseif undo then
    view:line(("deploy record %s (%s): undoing it in %s"):format(record_dir,
      pointer_kind == "inflight" and "a deploy whose run did not finish" or "the last successful deploy", undo.target))
  end
  local stream, eerr = events.open({ path = rolling.default_events_file(env.user),
    view = function(ev) view:event(ev) end })
  if not stream then return not_started("%s", tostring(eerr)) end
  local ctx = { manager = m, events = stream, state_root = state_root, user = env.user, platform = platform(),
    opts = { force = opts.force }, hooks_for = function() return nil end }

  -- A restore stopped half-way leaves the service stopped or with a mixed definition: a
  -- signal is noted, and the rollback goes on to its end.
  local function on_signal(sig)
    io.stderr:write(("rrengine: %s: the rollback of %s goes on to its end\n"):format(sig, svc.name))
  end
  rr.on_signal(on_signal)
  local t0 = rr.now()
  local done, rok, rerr = pcall(flow.rollback, ctx, svc, "manual rollback (REPL)", undo)
  rr.off_signal(on_signal)
  stream:close()
  if not done then error(rok, 0) end
  if not rok then
    return ("rollback of %s FAILED: %s (manual steps above)"):format(svc.name, tostring(rerr))
  end
  for _, kind in ipairs(clear) do
    local cok, cerr = deploy.remove_pointer(state_root, svc.name, kind)
    if not cok then
      io.stderr:write(("rrengine: rolled back, but cannot remove %s: %s\n"):format(
        deploy.pointer(state_root, svc.name, kind), tostring(cerr)))
    end
  end
  return ("rolled back: %s (%s)"):format(svc.name, ms_text(math.floor((rr.now() - t0) * 1000 + 0.5)))
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
    print(ok and ("rrengine REPL: %d services from %s (%s manager). Try status(), health(name), restart(name), rollback(name), events(), journal(name).")
      :format(#env.platform.services, env.file, env.user and "user" or "system") or ("rrengine REPL: " .. perr))
  else
    print("rrengine REPL: no " .. env.file .. " here; services_file(path) loads one.")
  end
end

return repl
