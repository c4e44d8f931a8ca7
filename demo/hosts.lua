-- demo/hosts.lua (`make demo-hosts`; `make demo` runs it after demo/run): one platform on two
-- hosts, a dependency across them.
--
--   1. start two test hosts on this machine, h1 and h2: each a real sshd on 127.0.0.1 (a port
--      of its own, a host key and a client key made for the demo) whose sessions reach that
--      host's own sandboxed systemd user manager (spec/support/hosts.lua, what the specs use)
--   2. install a small platform: db and queue on h1, api and worker on h2; api depends on db,
--      worker on api and queue: the order crosses hosts both ways
--   3. a rolling restart of it all from here (plans/rolling.lua --ssh-config ... --parallel 0):
--      each unit through its host's manager over ssh, api's migration run on h2, the state kept
--      on each host; the view puts each line's host in a column and counts per host
--   4. check the cross-host order from the hosts' own managers (when each unit became active)
--   5. tear both hosts down
--
-- Exit status 0 when the run exited 0 and the order held. Needs root (sshd and the sandboxes).
--   ./rrengine demo/hosts.lua          (RR_DEMO_KEEP=1 keeps the directory)
local rr = require("rr")
local fs = require("rr.fs")
local proc = require("rr.proc")
local systemd = require("rr.systemd")
local hosts = require("spec.support.hosts")
local units = require("spec.support.units")

local tty = fs.isatty(1)
local B, G, R, D, N = "", "", "", "", ""
if tty then B, G, R, D, N = "\27[1m", "\27[32m", "\27[31m", "\27[2m", "\27[0m" end
local step_no = 0
local function heading(text)
  step_no = step_no + 1
  io.write(("\n%s[%d/5] %s%s\n"):format(B, step_no, text, N))
end
local function say(text) io.write("  ", text, "\n") end
local function show(text) io.write(("  %s$ %s%s\n"):format(D, text, N)) end
local problems = {}
local function expect(what, cond)
  if cond then io.write(("  %s✔ %s%s\n"):format(G, what, N))
  else
    io.write(("  %s✘ %s%s\n"):format(R, what, N))
    problems[#problems + 1] = what
  end
end

local id = proc.run({ "id", "-u" }, { capture = true })
if not id or id.stdout ~= "0\n" then
  io.stderr:write("demo/hosts.lua: needs root (sshd and the sandboxed managers): sudo make demo-hosts\n")
  os.exit(1)
end

local started = rr.now()
local hs, dir
-- Ctrl-C: the engine's child run takes it (it finishes or rolls back what is in flight); here it
-- only means "tear down and stop" once that run has ended.
local interrupted
local handler = rr.on_signal(function(name) interrupted = name end)

local function teardown()
  if hs then hosts.stop(hs) end
  hs = nil
  if dir and os.getenv("RR_DEMO_KEEP") ~= "1" then fs.remove_tree(dir) end
end

local function main()
  -- ---------------------------------------------------------------- 1. hosts
  heading("Two hosts on this machine: h1 and h2")
  hs = hosts.start(2)
  dir = assert(fs.mkdtemp("/tmp/rrdemo-hosts."))
  for _, h in ipairs(hs) do
    say(("%s: sshd (pid %d) on 127.0.0.1:%d, its own systemd user manager (pid %d), units in %s")
      :format(h.name, h.sshd_pid, h.port, h.manager_pid, h.unit_dir))
  end
  say("ssh config (one ControlMaster connection per host): " .. hs[1].ssh_config)

  -- ---------------------------------------------------------------- 2. platform
  heading("A platform across them: db and queue on h1, api and worker on h2")
  local h1, h2 = hs[1], hs[2]
  local code = h2.dir .. "/srv/api"
  assert(fs.mkdir_p(code, 493))
  assert(fs.write_atomic(code .. "/version", "v1\n"))
  local port = units.free_port()
  local function unit(h, name, opts)
    opts.description = "demo on " .. h.name .. ": " .. name
    h:write_unit(name .. ".service", opts)
  end
  unit(h1, "demo-db", { exec = units.fixture_argv(units.free_port()) })
  unit(h1, "demo-queue", { exec = units.fixture_argv(units.free_port()) })
  unit(h2, "demo-api", { exec = units.fixture_argv(port, { version_file = code .. "/version" }), reload = true,
    extra_service = { WorkingDirectory = code } })
  unit(h2, "demo-worker", { exec = units.fixture_argv(units.free_port()) })
  local services = dir .. "/services.lua"
  assert(fs.write_atomic(services, ([[
-- The two-host demo's platform (demo/hosts.lua writes it): every service names its host, an ssh
-- alias of the config given with --ssh-config.
--
--   h1: demo-db    demo-queue
--          |           |
--   h2: demo-api       |          api waits for db (h1), worker for api and queue
--          \           |
--           demo-worker
return {
  defaults = { health = { timeout = 10, retries = 1, interval = 0.5 }, stabilize = 1 },
  services = {
    { name = "demo-db", unit = "demo-db.service", host = "h1", health = "systemd" },
    { name = "demo-queue", unit = "demo-queue.service", host = "h1", health = "systemd" },
    { name = "demo-api", unit = "demo-api.service", host = "h2", depends = { "demo-db" },
      health = { url = "http://127.0.0.1:%d/health", expect_body = "ok" },
      working_dir = %q,
      -- runs on h2, in its working dir there, through h2's manager (systemd-run over ssh)
      migrate = { "/bin/sh", "-c", "echo \"migrating for $(cat version) in $PWD\"" } },
    { name = "demo-worker", unit = "demo-worker.service", host = "h2", depends = { "demo-api", "demo-queue" },
      health = "systemd" },
  },
}
]]):format(port, code)))
  for _, h in ipairs(hs) do
    local m <close> = assert(systemd.remote(h.name, { user = true, ssh_config = h.ssh_config }))
    assert(m:daemon_reload())
    for _, name in ipairs(h == h1 and { "demo-db", "demo-queue" } or { "demo-api", "demo-worker" }) do
      assert(assert(m:unit(name .. ".service")):start())
    end
  end
  say("Services file " .. services .. ":")
  say("  h1: demo-db, demo-queue      h2: demo-api (depends on demo-db), demo-worker (on demo-api, demo-queue)")
  say("Every unit started on its host. The engine reaches each host's manager through ssh")
  say("(systemd-stdio-bridge, as systemctl -H does) and keeps each service's state on its host.")

  -- ---------------------------------------------------------------- 3. the run
  heading("A rolling restart across both hosts, dependencies first")
  say("The order crosses hosts: demo-api (h2) waits for demo-db (h1), demo-worker (h2) for")
  say("demo-api and demo-queue (h1). Each line starts with its host; finished lines count per host.")
  io.write("\n")
  local events = dir .. "/events.jsonl"
  local argv = { "./rrengine", "plans/rolling.lua", "--user", "--services", services, "--ssh-config",
    h1.ssh_config, "--events", events, "--parallel", "0" }
  show(table.concat(argv, " "))
  io.flush()
  local res, _, _, r = proc.run(argv, { timeout = 120, capture = false,
    on_line = function(_, line) io.write(line, "\n"); io.flush() end })
  res = res or r
  local rc = res and res.exit_code
  io.write("\n")
  if interrupted then return nil, "interrupted" end

  -- ---------------------------------------------------------------- 4. the order
  heading("The order, as the hosts' own managers saw it")
  local at = {}
  for _, h in ipairs(hs) do
    local m <close> = assert(systemd.remote(h.name, { user = true, ssh_config = h.ssh_config }))
    for _, name in ipairs(h == h1 and { "demo-db", "demo-queue" } or { "demo-api", "demo-worker" }) do
      -- both managers run on this machine's kernel: one monotonic clock
      at[name] = { host = h.name, usec = tonumber(assert(m:unit(name .. ".service")):get("ActiveEnterTimestampMonotonic")) or 0 }
    end
  end
  local names = { "demo-db", "demo-queue", "demo-api", "demo-worker" }
  table.sort(names, function(a, b) return at[a].usec < at[b].usec end)
  local t0 = at[names[1]].usec
  for _, name in ipairs(names) do
    say(("%-12s on %s  active again at +%.2f s"):format(name, at[name].host, (at[name].usec - t0) / 1e6))
  end
  io.write("\n")
  expect(("exit code %s (expected 0: every service restarted and healthy)"):format(tostring(rc)), rc == 0)
  expect("demo-db (h1) was active again before demo-api (h2) restarted",
    at["demo-db"].usec > 0 and at["demo-db"].usec < at["demo-api"].usec)
  expect("demo-api (h2) and demo-queue (h1) before demo-worker (h2)",
    at["demo-api"].usec < at["demo-worker"].usec and at["demo-queue"].usec < at["demo-worker"].usec)
  local snap = fs.exists(h2.env.XDG_STATE_HOME .. "/rrengine/snapshots/demo-api/current")
  expect("demo-api's known-good snapshot is kept on h2 (" .. h2.env.XDG_STATE_HOME .. "/rrengine)", snap)
  return true
end

local ok, err = pcall(main)
rr.off_signal(handler)
heading("Teardown")
teardown()
say("both hosts stopped (their sshd, connections and managers, by PID)" ..
  (os.getenv("RR_DEMO_KEEP") == "1" and dir and (", kept " .. dir) or ""))
io.write("\n")
if not ok or err == nil and interrupted then
  io.stderr:write(("%sdemo/hosts.lua: %s%s\n"):format(R, interrupted and "interrupted" or tostring(err), N))
  os.exit(interrupted and 130 or 1)
end
if #problems > 0 then
  io.write(("%sThe two-host demo did not go as expected:%s\n"):format(R, N))
  for _, p in ipairs(problems) do io.write("  - ", p, "\n") end
  os.exit(1)
end
io.write(("%sTwo-host demo done in %.0fs: one run across h1 and h2, dependencies first across hosts.%s\n")
  :format(G, rr.now() - started, N))
