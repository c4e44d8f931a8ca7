-- rrengine plans/rollback.lua --service NAME: put a service back by hand — the known-good unit
-- definition (unit file, drop-ins, environment files) and, when the last run deployed code,
-- that deploy undone — then daemon-reload, start, health check. What the seed runbook did
-- with cp and systemctl, through the same steps as an automatic rollback.
local cli = require("rr.cli")
local systemd = require("rr.systemd")
local fs = require("rr.fs")
local events = require("rr.events")
local flow = require("rr.flow")
local deploy = require("rr.deploy")
local rolling = require("rr.rolling")
local ui = require("rr.ui")

local spec = {
  usage = "rrengine plans/rollback.lua --service NAME [options]",
  summary = "Restore a service's last known good definition (and undo its last code deploy), then start it and check its health.",
  examples = {
    { "rrengine plans/rollback.lua --service sso.api", "roll sso.api back" },
    { "rrengine plans/rollback.lua --service sso.api --user", "the same on your user manager" },
  },
  options = {
    { name = "service", type = "string", value = "NAME", help = "the service to roll back" },
    { name = "services", key = "services_file", type = "string", value = "FILE", default = "services.lua",
      help = "the services file (default ./services.lua)" },
    { name = "user", help = "talk to your user service manager, as systemctl --user" },
    { name = "events", key = "events_file", type = "string", value = "FILE", help = "event log (default as plans/rolling.lua)" },
    { name = "no-code", key = "no_code", help = "restore the definition only; leave the code as it is" },
    { name = "force", help = "skip the health check after the start" },
    { name = "help", short = "h", help = "show this help" },
  },
  exit_codes = { { 0, "rolled back and healthy" }, { 2, "usage or configuration error, nothing touched" },
    { 3, "the rollback failed: manual action needed (steps printed)" } },
}

local function die(code, msg)
  io.stderr:write("rrengine: ", msg, "\n")
  os.exit(code)
end

local opts, platform = cli.plan_start({ ... }, spec, {
  try_help = true,
  check = function(o) return o.service ~= nil, "--service NAME is required" end,
})
local svc = platform.by_name[opts.service]
if not svc then die(2, ("unknown service %q in %s"):format(opts.service, opts.services_file)) end

local manager, merr = (opts.user and systemd.user or systemd.system)()
if not manager then die(1, merr) end
local state_root = rolling.state_root(opts.user)
fs.mkdir_p(state_root, 448)
local lock, lerr = fs.lock(state_root .. "/run.lock")
if not lock then die(1, "another rrengine run holds the lock: " .. lerr) end

local record
local pointer = flow.last_deploy_pointer(state_root, svc.name)
if not opts.no_code and fs.stat(pointer) then
  local dir = fs.read(pointer)
  local derr
  record, derr = deploy.load(dir)
  if not record then die(1, ("cannot read the last deploy record %s: %s"):format(dir, derr)) end
end

local view = ui.new({})
local stream = assert(events.open({ path = opts.events_file or rolling.default_events_file(opts.user),
  view = function(ev) view:event(ev) end }))
local ctx = { manager = manager, events = stream, state_root = state_root, user = opts.user,
  opts = { force = opts.force }, hooks_for = function() return nil end }
local ok, rerr = flow.rollback(ctx, svc, "manual rollback (plans/rollback.lua)", record)
stream:close()
if ok then
  if record then fs.remove(pointer) end
  lock:unlock()
  os.exit(0)
end
lock:unlock()
io.stderr:write("rrengine: rollback of ", svc.name, " failed: ", rerr, "\n")
os.exit(3)
