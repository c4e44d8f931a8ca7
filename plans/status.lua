-- rrengine plans/status.lua [--services FILE] [--user] [-H HOST] [--ssh-config FILE] [--json]:
-- every service's unit state and health, checked concurrently, on every host the services file
-- names (one manager per host, through ssh). Exit 0 when all are healthy, 1 otherwise (a host
-- that cannot be reached too), 4 when a killed run is not resolved (it is shown first, "!!"), on
-- this machine or on a host. A host's journal written by an engine on another machine is shown
-- ("??": that engine's PID cannot be checked from here) without changing the exit code; a run in
-- progress ("==") neither.
local cli = require("rr.cli")
local systemd = require("rr.systemd")
local status = require("rr.status")

local spec = {
  usage = "rrengine plans/status.lua [options]",
  summary = "Unit state and health of every service, one look each, all at once.",
  examples = { { "rrengine plans/status.lua --user", "status of the platform on your user manager" } },
  options = {
    { name = "services", key = "services_file", type = "string", value = "FILE",
      help = "the services file (default: ./services.lua, else /etc/rrengine/services.lua; with --user "
        .. "$XDG_CONFIG_HOME/rrengine/services.lua)" },
    { name = "user", help = "talk to your user service manager (on every host: the ssh user's)" },
    { name = "host", short = "H", type = "string", value = "HOST",
      help = "only the services on HOST (as systemctl -H); a services file without hosts: all of them, on HOST" },
    { name = "ssh-config", key = "ssh_config", type = "string", value = "FILE",
      help = "the ssh config for the hosts (default: $RR_SSH_CONFIG, else ssh's own)" },
    { name = "json", help = "one JSON array on stdout" },
    { name = "help", short = "h", help = "show this help" },
  },
}
local services = require("rr.services")
local opts, platform = cli.plan_start({ ... }, spec, { check = function(o)
  if o.host ~= nil then
    local host, problem = services.parse_host(o.host)
    if not host then return nil, ("option --host %s: %s"):format(("%q"):format(o.host), problem) end
    o.host = host
  end
  return true
end })
local list = platform.services
if opts.host then
  list = {}
  local named = false
  for _, svc in ipairs(platform.services) do
    if svc.host then named = true end
    if svc.host == opts.host then list[#list + 1] = svc end
  end
  if not named then
    -- a platform without hosts: the same units, looked at on that host
    for i, svc in ipairs(platform.services) do
      local copy = {}
      for k, v in pairs(svc) do copy[k] = v end
      copy.host = opts.host
      list[i] = copy
    end
  elseif #list == 0 then
    local hosts = {}
    for _, h in ipairs(status.hosts(platform.services)) do hosts[#hosts + 1] = h or "local" end
    io.stderr:write(("rrengine: no service of %s is on host %s (its hosts: %s)\n"):format(platform.source, opts.host,
      table.concat(hosts, ", ")))
    os.exit(2)
  end
end
local manager
if not opts.host and status.hosts(list)[1] == false then
  local merr
  manager, merr = (opts.user and systemd.user or systemd.system)()
  if not manager then io.stderr:write("rrengine: ", merr, "\n"); os.exit(1) end
end
-- a blue-green service: a row per colour, the live one named
list = status.expand(list, require("rr.state").root(opts.user), { user = opts.user, ssh_config = opts.ssh_config })
local rows, unreachable = status.collect_hosts(list, { manager = manager, user = opts.user,
  ssh_config = opts.ssh_config })
-- a run that was killed mid-way comes first, on any host: its services may be half done. A journal
-- on a host written by an engine elsewhere is shown as such: whether that run still goes on
-- cannot be told from here.
local journal = require("rr.journal")
local found = status.journals(list, { user = opts.user, ssh_config = opts.ssh_config, skip = unreachable })
local dead = false
for _, f in ipairs(found) do
  if f.look.writer == "dead" then dead = true end
end
if opts.json then
  local out = require("cjson").encode(rows)
  io.write(out, "\n")
else
  for _, f in ipairs(found) do
    local mark = ({ dead = "!! ", unknown = "?? ", alive = "== " })[f.look.writer]
    for _, line in ipairs(journal.look_lines(f.look, f.host, f.root)) do io.write(mark, line, "\n") end
  end
  if #found > 0 then io.write("\n") end
  io.write(status.format(rows), "\n")
  -- groups held after their canary (--canary-only): on purpose on two releases
  local state_root = require("rr.state").root(opts.user)
  for _, line in ipairs(status.held(state_root, { services_file = opts.services_file, user = opts.user })) do
    io.write(line, "\n")
  end
end
if dead then os.exit(4) end
-- a blue-green service's idle colour is stopped on purpose
local idle = {}
for _, svc in ipairs(list) do
  if svc.colour and not svc.live then idle[svc.name] = true end
end
for _, r in ipairs(rows) do
  if r.health ~= "healthy" and not idle[r.name] then os.exit(1) end
end
