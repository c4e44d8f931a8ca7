-- rrengine plans/rollback.lua --service NAME: put a service back by hand — the known-good unit
-- definition (unit file, its own drop-ins, environment files) and a code deploy undone — then
-- daemon-reload, start, health check. What the seed runbook did with cp and systemctl, through
-- the same steps as an automatic rollback (rr.flow.rollback).
--
-- Which deploy is undone (state_root/deploys/, see rr.deploy's pointers):
--   1. --deploy-record DIR, when given (the command a failed rollback prints);
--   2. else the <service>.inflight pointer's record: a deploy whose run did not finish (the
--      engine was killed, or its own undo failed) — the one to undo, whatever .last says;
--   3. else the <service>.last pointer's record: the last deploy whose run succeeded.
-- A record already undone is not undone again, and neither is an .inflight deploy that never
-- started changing files (no record, no backup: the engine was killed before); the code is
-- then left as it is — never the .last deploy undone instead. After a successful rollback the
-- pointer that named the record is removed. With no known-good snapshot and no deploy to undo there is
-- nothing to restore: the service is not touched (exit 1).
local cli = require("rr.cli")
local systemd = require("rr.systemd")
local fs = require("rr.fs")
local events = require("rr.events")
local flow = require("rr.flow")
local deploy = require("rr.deploy")
local snapshot = require("rr.snapshot")
local rolling = require("rr.rolling")
local ui = require("rr.ui")

local spec = {
  usage = "rrengine plans/rollback.lua --service NAME [options]",
  summary = "Restore a service's last known good definition and undo its code deploy (the unfinished "
    .. "one if a run did not finish, else the last one), then start it and check its health.",
  examples = {
    { "rrengine plans/rollback.lua --service sso.api", "roll sso.api back" },
    { "rrengine plans/rollback.lua --service sso.api --deploy-record /var/lib/rrengine/runs/RUN/sso.api",
      "undo exactly the deploy recorded in that directory (the command a failed rollback prints)" },
    { "rrengine plans/rollback.lua --service sso.api --no-code",
      "restore the definition only; leave the code as it is" },
    { "rrengine plans/rollback.lua --service sso.api --user", "the same on your user manager" },
  },
  options = {
    { name = "service", type = "string", value = "NAME", help = "the service to roll back" },
    { name = "deploy-record", key = "deploy_record", type = "string", value = "DIR",
      help = "undo the deploy recorded in DIR (STATE/runs/RUN/SERVICE) instead of the one "
        .. "STATE/deploys/SERVICE.inflight or .last names" },
    { name = "no-code", key = "no_code", help = "restore the definition only; leave the code as it is" },
    { name = "services", key = "services_file", type = "string", value = "FILE", default = "services.lua",
      help = "the services file" },
    { name = "user", help = "talk to your user service manager, as systemctl --user" },
    { name = "events", key = "events_file", type = "string", value = "FILE", help = "event log (default as plans/rolling.lua)" },
    { name = "force", help = "skip the health check after the start" },
    { name = "help", short = "h", help = "show this help" },
  },
  exit_codes = {
    { 0, "rolled back and healthy" },
    { 1, "nothing was touched: another run holds the lock, the deploy record cannot be read, there is "
      .. "nothing to restore (no known good snapshot and no deploy to undo), or the service manager or "
      .. "the event log cannot be reached" },
    { 2, "usage or configuration error, nothing touched" },
    { 3, "the rollback failed: manual action needed (steps printed)" },
  },
}

local function die(code, msg)
  io.stderr:write("rrengine: ", msg, "\n")
  os.exit(code)
end

local opts, platform = cli.plan_start({ ... }, spec, {
  try_help = true,
  check = function(o)
    if o.service == nil then return nil, "--service NAME is required" end
    if o.deploy_record and o.no_code then
      return nil, "--deploy-record and --no-code contradict each other (undo that deploy, or leave the code)"
    end
    if o.args[1] then return nil, ("unexpected argument %q"):format(o.args[1]) end
    return true
  end,
})
local svc = platform.by_name[opts.service]
if not svc then die(2, ("unknown service %q in %s"):format(opts.service, opts.services_file)) end

-- A path as compared with a pointer's: trimmed, no trailing slash, resolved when it exists.
local function canonical(path)
  local p = path:match("^%s*(.-)%s*$"):gsub("/+$", "")
  if p == "" then p = "/" end
  return fs.realpath(p) or p
end

local explicit
if opts.deploy_record then
  if not svc.working_dir then
    die(2, ("service %q has no working_dir: no deploy record can be its"):format(svc.name))
  end
  explicit = canonical(opts.deploy_record)
end

local manager, merr = (opts.user and systemd.user or systemd.system)()
if not manager then die(1, merr) end
local state_root = rolling.state_root(opts.user)
local ok, mkerr = fs.mkdir_p(state_root, 448)
if not ok then die(1, ("cannot create %s: %s"):format(state_root, tostring(mkerr))) end
local lock_path = state_root .. "/run.lock"
local lock, lerr = fs.lock(lock_path)
if not lock then die(1, ("another rrengine run holds the lock (%s): %s"):format(lock_path, tostring(lerr))) end

local function fail(code, msg)
  lock:unlock()
  die(code, msg)
end

-- The deploy record: which one, from where.
local record, record_dir, source, pointer_kind
if explicit then
  record_dir, source = explicit, "--deploy-record"
elseif not opts.no_code then
  for _, kind in ipairs({ "inflight", "last" }) do
    local dir, _, code = deploy.read_pointer(state_root, svc.name, kind)
    local path = deploy.pointer(state_root, svc.name, kind)
    if dir then
      record_dir, source, pointer_kind = dir, path, kind
      break
    elseif code ~= "ENOENT" and fs.stat(path) then
      fail(1, ("cannot read the deploy pointer %s (remove it, or name the record with --deploy-record DIR)")
        :format(path))
    end
  end
end
-- A deploy the engine was killed before it changed anything: the pointer is written before
-- apply, which writes its record before rsync runs. No record and no backup: nothing to undo.
local never_started = record_dir and pointer_kind == "inflight"
  and not fs.exists(record_dir .. "/deploy.json") and not fs.exists(record_dir .. "/backup")
if record_dir and not never_started then
  local derr
  record, derr = deploy.load(record_dir)
  if not record then
    fail(1, ("cannot read the deploy record %s (from %s): %s%s"):format(record_dir, source, tostring(derr),
      pointer_kind and "; to roll back without it, remove that pointer or use --no-code" or ""))
  end
  if explicit and canonical(record.target) ~= canonical(svc.working_dir) then
    fail(2, ("the deploy record %s is a deploy into %s, not into %s's working_dir %s"):format(
      record_dir, record.target, svc.name, svc.working_dir))
  end
end

-- Pointers that name the record: removed once it is undone.
local pointers_to_clear = {}
if never_started then
  pointers_to_clear[1] = "inflight"
elseif record then
  for _, kind in ipairs({ "inflight", "last" }) do
    local dir = deploy.read_pointer(state_root, svc.name, kind)
    if kind == pointer_kind or (dir and canonical(dir) == canonical(record_dir)) then
      pointers_to_clear[#pointers_to_clear + 1] = kind
    end
  end
end

local view = ui.new({})
local function say(text) view:line(text) end

local undo = record
if record then
  local when = ("created %s%s"):format(tostring(record.created_at),
    record.applied_at and (", applied " .. record.applied_at) or "")
  local why = pointer_kind == "inflight" and " — a deploy whose run did not finish"
    or pointer_kind == "last" and " — the last successful deploy" or ""
  if record.state == "undone" then
    undo = nil
    say(("deploy record %s (from %s): already undone%s; the code is left as it is"):format(
      record_dir, source, record.undone_at and (" at " .. record.undone_at) or ""))
  else
    say(("deploy record %s (from %s%s): state %s, %s; undoing it in %s"):format(
      record_dir, source, why, tostring(record.state), when, record.target))
    if record.state == "applying" then
      say("note: that deploy was interrupted during rsync; if its rsync still runs (pgrep -a rsync), "
        .. "stop it first")
    end
    if pointer_kind == "last" then
      -- A later deploy of this service that was undone already (its run rolled back): the
      -- code now is the .last one, and undoing it goes one release further back.
      local runs = state_root .. "/runs"
      for _, run in ipairs(fs.list(runs) or {}) do
        local dir = runs .. "/" .. run .. "/" .. svc.name
        local later = fs.stat(dir .. "/deploy.json") and deploy.load(dir)
        if later and later.state == "undone" and tostring(later.created_at) > tostring(record.created_at)
            and canonical(dir) ~= canonical(record_dir) then
          say(("note: a later deploy (%s, created %s) was already undone; this undoes the release "
            .. "before it too (--no-code leaves the code as it is)"):format(dir, tostring(later.created_at)))
          break
        end
      end
    end
  end
elseif never_started then
  say(("deploy pointer %s names %s, which holds no deploy record: that deploy never started "
    .. "changing files; the code is left as it is"):format(source, record_dir))
elseif opts.no_code then
  say("--no-code: the code is left as it is")
end

local known = snapshot.known_good(state_root, svc.name)
if known then
  say(("definition: the known-good snapshot of run %s (%s), %s"):format(tostring(known.run),
    tostring(known.created), known.dir))
end

if not known and not undo then
  local code_part
  if opts.no_code then
    code_part = "--no-code leaves the code as it is"
  elseif record then
    code_part = ("the deploy recorded in %s is already undone"):format(record_dir)
  elseif never_started then
    code_part = ("the deploy %s names never started changing files"):format(source)
  else
    code_part = ("no code deploy to undo (no %s or %s)"):format(
      deploy.pointer(state_root, svc.name, "inflight"), deploy.pointer(state_root, svc.name, "last"))
  end
  fail(1, ("nothing to restore for %s: no known-good snapshot of its definition (a successful run "
    .. "records one), and %s; the service was not touched"):format(svc.name, code_part))
end

local stream, eerr = events.open({ path = opts.events_file or rolling.default_events_file(opts.user),
  view = function(ev) view:event(ev) end })
if not stream then fail(1, tostring(eerr)) end

local ctx = { manager = manager, events = stream, state_root = state_root, user = opts.user,
  platform = platform, opts = { force = opts.force }, hooks_for = function() return nil end }
-- An .inflight pointer naming another deploy than the one undone here must survive: it is the
-- only trace of an unfinished deploy (rr.flow's rollback clears .inflight after any undo).
local other_inflight = deploy.read_pointer(state_root, svc.name, "inflight")
if other_inflight and (not record_dir or canonical(other_inflight) == canonical(record_dir)) then
  other_inflight = nil
end
local rok, rerr = flow.rollback(ctx, svc, "manual rollback (plans/rollback.lua)", undo)
stream:close()
if other_inflight and not deploy.read_pointer(state_root, svc.name, "inflight") then
  deploy.write_pointer(state_root, svc.name, "inflight", other_inflight)
end
if rok then
  for _, kind in ipairs(pointers_to_clear) do
    local cok, cerr = deploy.remove_pointer(state_root, svc.name, kind)
    if not cok then
      io.stderr:write(("rrengine: rolled back, but cannot remove %s: %s\n"):format(
        deploy.pointer(state_root, svc.name, kind), tostring(cerr)))
    end
  end
  lock:unlock()
  os.exit(0)
end
lock:unlock()
io.stderr:write("rrengine: rollback of ", svc.name, " failed: ", tostring(rerr), "\n")
os.exit(3)
