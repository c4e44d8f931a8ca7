-- rrengine plans/status.lua [--services FILE] [--user] [--json]: every service's unit state and
-- health, checked concurrently. Exit 0 when all are healthy, 1 otherwise, 4 when a killed run
-- is not resolved (it is shown first).
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
    { name = "user", help = "talk to your user service manager" },
    { name = "json", help = "one JSON array on stdout" },
    { name = "help", short = "h", help = "show this help" },
  },
}
local opts, platform = cli.plan_start({ ... }, spec)
local manager, merr = (opts.user and systemd.user or systemd.system)()
if not manager then io.stderr:write("rrengine: ", merr, "\n"); os.exit(1) end
local rows = status.collect(manager, platform.services)
-- a run that was killed mid-way comes first: its services may be half done
local journal = require("rr.journal")
local dead = journal.interrupted(require("rr.state").root(opts.user))
if opts.json then
  local out = require("cjson").encode(rows)
  io.write(out, "\n")
else
  if dead then
    for _, line in ipairs(journal.describe(dead)) do io.write("!! ", line, "\n") end
    io.write("\n")
  end
  io.write(status.format(rows), "\n")
  -- groups held after their canary (--canary-only): on purpose on two releases
  local state_root = require("rr.state").root(opts.user)
  for group, rec in pairs(require("rr.canary").all_held(state_root)) do
    io.write(("group %s: canary held since %s: %s on the new release, the rest not yet "
      .. "(rrengine plans/rolling.lua --promote)\n"):format(group, tostring(rec.passed_at),
      table.concat(rec.canaries or {}, ", ")))
  end
end
if dead then os.exit(4) end
for _, r in ipairs(rows) do
  if r.health ~= "healthy" then os.exit(1) end
end
