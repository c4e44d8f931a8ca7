-- rrengine plans/rollback.lua --service NAME: put a service back by hand — the known-good unit
-- definition (unit file, its own drop-ins, environment files) and a code deploy undone — then
-- daemon-reload, start, health check. What the seed runbook did with cp and systemctl, through
-- the same steps as an automatic rollback (rr.flow.rollback). The work is rr.rollback's (shared
-- with the REPL's rollback(name)); this plan parses the options, prints and exits.
--
-- Which deploy is undone: the one --deploy-record DIR names (the command a failed rollback
-- prints), else the unfinished one (STATE/deploys/<service>.inflight), else the last successful
-- one (.last); one already undone, or one that never started changing files, is left alone (the
-- details are at the top of lua/rr/rollback.lua). With no known-good snapshot and no deploy to
-- undo there is nothing to restore: the service is not touched (exit 1).
--
-- A service with a host is rolled back on that host (its manager, and the records, lock and
-- journal in its state root), from any engine host.
--
-- --group NAME instead puts back the canaries a `plans/rolling.lua --canary-only` run holds
-- (rr.rollback.group): the group is on one release again, and the held record goes.
local cli = require("rr.cli")
local rollback = require("rr.rollback")

local spec = {
  usage = "rrengine plans/rollback.lua --service NAME | --group NAME [options]",
  summary = "Restore a service's last known good definition and undo its code deploy (the unfinished "
    .. "one if a run did not finish, else the last one), then start it and check its health.",
  examples = {
    { "rrengine plans/rollback.lua --service sso.api", "roll sso.api back" },
    { "rrengine plans/rollback.lua --service sso.api --deploy-record /var/lib/rrengine/runs/RUN/sso.api",
      "undo exactly the deploy recorded in that directory (the command a failed rollback prints)" },
    { "rrengine plans/rollback.lua --service sso.api --no-code",
      "restore the definition only; leave the code as it is" },
    { "rrengine plans/rollback.lua --service sso.api --user", "the same on your user manager" },
    { "rrengine plans/rollback.lua --group sso.api",
      "roll back the canaries of group sso.api held by plans/rolling.lua --canary-only" },
  },
  options = {
    { name = "service", type = "string", value = "NAME", help = "the service to roll back" },
    { name = "group", type = "string", value = "NAME",
      help = "roll back the canaries of group NAME held by plans/rolling.lua --canary-only (nothing held: "
        .. "says so, exit 0)" },
    { name = "deploy-record", key = "deploy_record", type = "string", value = "DIR",
      help = "undo the deploy recorded in DIR (STATE/runs/RUN/SERVICE) instead of the one "
        .. "STATE/deploys/SERVICE.inflight or .last names" },
    { name = "no-code", key = "no_code", help = "restore the definition only; leave the code as it is" },
    { name = "services", key = "services_file", type = "string", value = "FILE",
      help = "the services file (default: ./services.lua, else /etc/rrengine/services.lua; with --user "
        .. "$XDG_CONFIG_HOME/rrengine/services.lua)" },
    { name = "user", help = "talk to your user service manager, as systemctl --user" },
    { name = "ssh-config", key = "ssh_config", type = "string", value = "FILE",
      help = "the ssh config for a service on another host (default: $RR_SSH_CONFIG, else ssh's own)" },
    { name = "events", key = "events_file", type = "string", value = "FILE", help = "event log (default as plans/rolling.lua)" },
    { name = "force", help = "skip the health check after the start" },
    { name = "help", short = "h", help = "show this help" },
  },
  exit_codes = {
    { 0, "rolled back and healthy (--group: also when the group holds no canary; nothing touched then)" },
    { 1, "nothing was touched: another run holds the lock, the deploy record cannot be read, there is "
      .. "nothing to restore (no known good snapshot and no deploy to undo), or the service manager or "
      .. "the event log cannot be reached" },
    { 2, "usage or configuration error (an unknown --service or --group), nothing touched" },
    { 3, "the rollback failed: manual action needed (steps printed)" },
    { 4, "an earlier run was killed mid-way and is not resolved: nothing touched; run plans/rolling.lua --recover" },
  },
}

local function die(code, msg)
  io.stderr:write("rrengine: ", msg, "\n")
  os.exit(code)
end

local opts, platform = cli.plan_start({ ... }, spec, {
  try_help = true,
  check = function(o)
    if o.service == nil and o.group == nil then return nil, "--service NAME or --group NAME is required" end
    if o.service and o.group then
      return nil, "--service and --group contradict each other (one service, or a group's held canaries)"
    end
    if o.group and (o.deploy_record or o.no_code) then
      return nil, ("--%s goes with --service, not --group"):format(o.deploy_record and "deploy-record" or "no-code")
    end
    if o.deploy_record and o.no_code then
      return nil, "--deploy-record and --no-code contradict each other (undo that deploy, or leave the code)"
    end
    if o.args[1] then return nil, ("unexpected argument %q"):format(o.args[1]) end
    return true
  end,
})
if opts.group then
  local code, msg = rollback.group({ group = opts.group, platform = platform, user = opts.user, force = opts.force,
    events_file = opts.events_file, services_file = opts.services_file, ssh_config = opts.ssh_config })
  if code == 3 then msg = ("rollback of the canaries of group %s failed: %s"):format(opts.group, msg) end
  if code ~= 0 then die(code, msg) end
  if msg then io.write(msg, "\n") end
  os.exit(0)
end

local svc = platform.by_name[opts.service]
if not svc then die(2, ("unknown service %q in %s"):format(opts.service, opts.services_file)) end

local code, msg = rollback.run({ svc = svc, platform = platform, user = opts.user,
  deploy_record = opts.deploy_record, no_code = opts.no_code, force = opts.force,
  events_file = opts.events_file, reason = "manual rollback (plans/rollback.lua)", services_file = opts.services_file,
  ssh_config = opts.ssh_config,
  spell = { no_code = "--no-code", deploy_record = "--deploy-record DIR", named = "--deploy-record" } })
if code == 3 then msg = ("rollback of %s failed: %s"):format(svc.name, msg) end
if code ~= 0 then die(code, msg) end
os.exit(0)
