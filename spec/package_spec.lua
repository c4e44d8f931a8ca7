-- Packaging, for real: `make deb` builds the Debian package with dpkg-buildpackage; it is then
-- installed with dpkg -i into a throwaway copy of this machine, run from another directory,
-- purged, and what is left is checked. The same copy takes a `make install` / `make uninstall`.
--
-- The throwaway copy: a private mount namespace with an overlay whose lower layer is this
-- machine's / (its real dpkg database and libraries) and whose upper layer is a tmpfs; dpkg
-- runs in a chroot of it. Every write lands in the tmpfs and disappears with the namespace, so
-- the machine is left as it was (checked at the end); the upper layer shows exactly what an
-- install and a removal changed. Needs root (as the sandbox does).
local fs = require("rr.fs")
local proc = require("rr.proc")
local helpers = require("spec.support.helpers")

local root = fs.realpath(".")

-- Runs argv; returns the result table whatever the exit code.
local function run(argv, opts)
  local res, err, _, r = proc.run(argv, opts)
  local out = res or r
  assert(type(out) == "table", err)
  return out
end

-- Splits the throwaway root's report into sections: "=== name rc=N" then the output.
local function sections(text)
  local list, current = {}, nil
  for line in (text .. "\n"):gmatch("(.-)\n") do
    local name, rc = line:match("^=== (%S+) rc=(%d+)$")
    if name then
      current = { rc = tonumber(rc), out = "" }
      list[name] = current
    elseif current then
      current.out = current.out .. line .. "\n"
    end
  end
  return list
end

-- The commands run in the chroot, each as a section of the report.
local INSIDE = [==[
set -u
step() { local name=$1; shift; local out rc; out=$("$@" 2>&1); rc=$?; printf '=== %s rc=%d\n%s\n' "$name" "$rc" "$out"; }
export LC_ALL=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mkdir -p /tmp/elsewhere && cd /tmp/elsewhere || exit 9
# man-db's trigger would rebuild the man index of this throwaway root at each dpkg call (seconds)
rm -f /var/lib/man-db/auto-update

step before-status dpkg-query -W -f='${Status}' rrengine
step install dpkg -i "$DEB"
step status dpkg-query -W -f='${Status} ${Version}' rrengine
step version rrengine --version
step graph rrengine plans/graph.lua --services /usr/share/rrengine/services.example.lua
step timeline-help rrengine plans/timeline.lua --help
step timeline sh -c 'rrengine plans/timeline.lua "$0" -o /tmp/elsewhere/run.svg && head -c 200 /tmp/elsewhere/run.svg' "$EVENTS"
step status-plan rrengine plans/status.lua --services /nonexistent/services.lua
step man-path man -w rrengine rrengine-services
step man-page sh -c 'MANWIDTH=80 man rrengine-services 2>&1 | head -20'
step completion bash -c '. /usr/share/bash-completion/bash_completion; __load_completion rrengine && complete -p rrengine'
step logrotate cat /etc/logrotate.d/rrengine
step conffiles dpkg-query -W -f='${Conffiles}' rrengine
dpkg -L rrengine > /tmp/elsewhere/files
step purge dpkg --purge rrengine
step after-status dpkg-query -W -f='${Status}' rrengine
step left sh -c 'while read -r f; do [ -e "$f" ] && [ ! -d "$f" ] && echo "$f"; done < /tmp/elsewhere/files; for d in /usr/share/rrengine /usr/share/doc/rrengine /etc/logrotate.d/rrengine; do [ -e $d ] && echo $d; done; true'

# make install / make uninstall with another PREFIX, from a copy of the tree
step make-install make -C "$SRC" install PREFIX=/opt/rr V=1
step make-installed-run sh -c 'cd / && /opt/rr/bin/rrengine plans/graph.lua --services /opt/rr/share/rrengine/services.example.lua'
step make-installed-man man -w -M /opt/rr/share/man rrengine
step make-installed-zsh grep -c /opt/rr/share/bash-completion/completions/rrengine /opt/rr/share/zsh/site-functions/_rrengine
step make-installed-unit grep ExecStart= /opt/rr/share/doc/rrengine/examples/rrengine-restart@.service
step make-uninstall make -C "$SRC" uninstall PREFIX=/opt/rr
step make-left find /opt/rr -type f
]==]

-- Sets up the namespace and the overlay, runs INSIDE in the chroot, then reports what the
-- upper layer holds under /usr, /etc and /opt: files an install or a removal left behind.
local OUTSIDE = [==[
set -eu
T=$WORK/ovl
mount -t tmpfs -o mode=0755 tmpfs "$T"
mkdir "$T/upper" "$T/work" "$T/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$T/upper,workdir=$T/work" "$T/root"
for d in proc dev sys; do mount --rbind "/$d" "$T/root/$d"; done
set +e
chroot "$T/root" /bin/bash "$WORK/inside.sh"
echo "=== chroot rc=$?"
printf '=== upper rc=0\n'
# regular files and symlinks only: dpkg's removals show as whiteouts (character devices)
cd "$T/upper" && find usr etc opt \( -type f -o -type l \) 2>/dev/null | sort
]==]

describe("the Debian package and make install", function()
  local dir, deb, report, host_before

  -- What this machine has that the package would install: must be the same afterwards.
  local function host_state()
    local st = {}
    for _, p in ipairs({ "/usr/bin/rrengine", "/usr/share/rrengine", "/etc/logrotate.d/rrengine", "/opt/rr",
                         "/usr/share/man/man1/rrengine.1.gz", "/usr/share/bash-completion/completions/rrengine" }) do
      st[p] = fs.stat(p) ~= nil
    end
    st.dpkg = run({ "dpkg-query", "-W", "-f=${Status}", "rrengine" }).stdout
    return st
  end

  setup(function()
    host_before = host_state()
    dir = assert(fs.mkdtemp("/tmp/rr-package-"))
    -- the package, built once
    local built = run({ "make", "--no-print-directory", "deb" }, { cwd = root, timeout = 600,
      env = { DEB_BUILD_OPTIONS = "noddebs" } }) -- no -dbgsym package: not what is checked here
    assert(built.exit_code == 0, built.stdout .. built.stderr)
    local files = assert(fs.list(root .. "/build/deb"))
    for _, f in ipairs(files) do
      if f:match("^rrengine_.*%.deb$") then deb = root .. "/build/deb/" .. f end
    end
    assert(deb, "make deb made no rrengine_*.deb")
    -- an event log to draw, and a copy of the tree for make install
    helpers.write(dir .. "/events.jsonl",
      '{"ts":"2026-03-01T10:00:00.000Z","event":"SERVICE_RESTART_START","run":"r1","service":"a"}\n'
      .. '{"ts":"2026-03-01T10:00:01.000Z","event":"SERVICE_RESTART_SUCCESS","run":"r1","service":"a"}\n')
    assert(fs.mkdir_p(dir .. "/src", 493))
    local copy = run({ "rsync", "-a", "--exclude=/build", "--exclude=/.git", "--exclude=/rrengine",
      "--exclude=/rrengine-asan", root .. "/", dir .. "/src/" })
    assert(copy.exit_code == 0, copy.stderr)
    helpers.write(dir .. "/inside.sh", INSIDE)
    helpers.write(dir .. "/outside.sh", OUTSIDE)
    assert(fs.mkdir_p(dir .. "/ovl", 493))
    local res = run({ "unshare", "--mount", "--propagation", "private", "bash", dir .. "/outside.sh" }, {
      env = { WORK = dir, DEB = deb, EVENTS = dir .. "/events.jsonl", SRC = dir .. "/src" }, timeout = 300 })
    assert(res.exit_code == 0, res.stdout .. res.stderr)
    report = sections(res.stdout)
    assert(report.chroot and report.upper, res.stdout .. res.stderr)
  end)

  teardown(function()
    if dir then fs.remove_tree(dir) end
  end)

  -- A section of the report that must have succeeded; returns its output.
  local function ok(name)
    local s = report[name]
    assert(s, "no section " .. name)
    assert(s.rc == 0, ("%s exited %d:\n%s"):format(name, s.rc, s.out))
    return s.out
  end

  it("builds a .deb whose version is the Makefile's and the changelog's", function()
    local makefile = assert(fs.read(root .. "/Makefile"))
    local version = makefile:match("\nVERSION%s*%?=%s*(%S+)")
    local changelog = assert(fs.read(root .. "/debian/changelog"))
    assert.equal(version, changelog:match("^rrengine %(([^)%-]+)"))
    assert.matches("rrengine_" .. version:gsub("%p", "%%%0") .. "_", deb)
    local info = run({ "dpkg-deb", "-f", deb, "Package", "Version", "Depends" })
    assert.matches("Version: " .. version:gsub("%p", "%%%0"), info.stdout)
    assert.matches("liblua5%.4%-0", info.stdout) -- shlibs found the engine's libraries
    assert.matches("lua%-cjson", info.stdout)
  end)

  it("installs with dpkg -i and runs from any directory: --version, plans, man pages, completion", function()
    assert.equal(1, report["before-status"].rc, "rrengine was already installed in the throwaway root")
    ok("install")
    assert.matches("^install ok installed", ok("status"))
    assert.matches("^rrengine %d+%.%d+%.%d+ ", ok("version"))
    local graph = ok("graph")
    assert.matches("sso%.postgresql", graph)
    assert.matches("wave 1:", graph)
    assert.matches("^Usage: rrengine plans/timeline%.lua", ok("timeline-help"))
    assert.matches("<svg", ok("timeline"))
    -- a plan that reaches its services file: found from /tmp/elsewhere, and says what is wrong
    assert.equal(2, report["status-plan"].rc)
    assert.matches("^rrengine: /nonexistent/services%.lua: cannot read the services file", report["status-plan"].out)
    local paths = ok("man-path")
    assert.matches("/usr/share/man/man1/rrengine%.1%.gz", paths)
    assert.matches("/usr/share/man/man5/rrengine%-services%.5%.gz", paths)
    assert.matches("rrengine%-services %- the services file", ok("man-page"))
    assert.matches("complete %-F _rrengine rrengine", ok("completion"))
    assert.matches("/var/log/rrengine/events%.jsonl", ok("logrotate"))
    assert.matches("/etc/logrotate%.d/rrengine", ok("conffiles"))
  end)

  it("purges cleanly: no file of the package and nothing under /usr or /etc is left", function()
    ok("purge")
    assert.not_equal(0, report["after-status"].rc, report["after-status"].out)
    assert.equal("", ok("left"):gsub("%s+", ""))
  end)

  it("make install with another PREFIX works from / and make uninstall removes all of it", function()
    ok("make-install")
    assert.matches("wave 1:", ok("make-installed-run"))
    assert.matches("^/opt/rr/share/man/man1/rrengine%.1", ok("make-installed-man"))
    assert.equal("1", ok("make-installed-zsh"):gsub("%s+", ""))
    assert.equal("ExecStart=/opt/rr/bin/rrengine", ok("make-installed-unit"):match("^ExecStart=%S+"))
    ok("make-uninstall")
    assert.equal("", (ok("make-left"):gsub("%s+", "")))
  end)

  it("the throwaway root's upper layer holds no file under /usr, /etc or /opt afterwards", function()
    assert.equal(0, report.chroot.rc)
    assert.equal("", report.upper.out:gsub("%s+", ""), report.upper.out)
  end)

  it("leaves this machine as it found it", function()
    assert.same(host_before, host_state())
  end)
end)

-- contrib/systemd/rrengine-restart@.{service,timer}, run by the sandboxed user manager: the
-- service as shipped, but for its ExecStart (this engine, --user, this platform's files).
describe("rrengine-restart@.service and .timer", function()
  local rr = require("rr")
  local units = require("spec.support.units")
  local platform = require("spec.support.platform")
  local p, fifo, unit_dir
  local service_text = assert(fs.read(root .. "/contrib/systemd/rrengine-restart@.service"))
  local timer_text = assert(fs.read(root .. "/contrib/systemd/rrengine-restart@.timer"))

  setup(function()
    p = platform.new({
      -- its migration tells the spec it runs (a FIFO), then takes a moment
      { name = "api", http = true, code = true, stabilize = 0 },
    })
    fifo = p.dir .. "/migration.fifo"
    assert(run({ "mkfifo", fifo }).exit_code == 0)
    p.services[1].migrate = { "/bin/sh", "-c", "echo started > " .. fifo .. "; sleep 1; echo migrated" }
    helpers.write(p.services_file, "return " .. platform.serialize(p.services_table) .. "\n")
    p:start()
    unit_dir = units.dir()
  end)
  teardown(function()
    for _, name in ipairs({ "rrengine-restart@.service", "rrengine-restart@.timer" }) do os.remove(unit_dir .. "/" .. name) end
    p:teardown()
  end)

  -- Installs the units with KillMode= as given (nil: as shipped).
  local function install(kill_mode)
    local text = service_text:gsub("\nExecStart=[^\n]*", function()
      return ("\nEnvironment=XDG_STATE_HOME=%s\nExecStart=%s plans/rolling.lua --user --services %s --events %s --service %%I")
        :format(p.xdg_state, helpers.engine, p.services_file, p.events_file)
    end)
    if kill_mode then text = text:gsub("\nKillMode=%S+", "\nKillMode=" .. kill_mode) end
    helpers.write(unit_dir .. "/rrengine-restart@.service", text)
    helpers.write(unit_dir .. "/rrengine-restart@.timer", timer_text)
    assert(platform.manager():daemon_reload())
  end

  it("pass systemd-analyze verify without a warning", function()
    local dir = assert(fs.mkdtemp("/tmp/rr-units-"))
    -- an instance of each, with a binary that exists here
    helpers.write(dir .. "/rrengine-restart@x.service", (service_text:gsub("/usr/bin/rrengine", helpers.engine)))
    helpers.write(dir .. "/rrengine-restart@x.timer", timer_text)
    local res = run({ "systemd-analyze", "verify", "--man=no", dir .. "/rrengine-restart@x.service", dir .. "/rrengine-restart@x.timer" },
      { env = { SYSTEMD_LOG_LEVEL = "notice" } })
    -- and the check sees a mistake
    helpers.write(dir .. "/rrengine-restart@y.service", (service_text:gsub("/usr/bin/rrengine", helpers.engine)
      :gsub("KillMode=mixed", "KillMode=mixd")))
    local bad = run({ "systemd-analyze", "verify", "--man=no", dir .. "/rrengine-restart@y.service" },
      { env = { SYSTEMD_LOG_LEVEL = "notice" } })
    fs.remove_tree(dir)
    assert.equal(0, res.exit_code, res.stderr)
    assert.equal("", res.stderr .. res.stdout)
    assert.matches("kill mode", bad.stderr)
  end)

  it("a stop during the run reaches rrengine alone: the migration in flight finishes, the run ends well", function()
    install()
    local u = platform.manager():unit("rrengine-restart@api.service")
    local pid = p:props("api").MainPID
    local starting = rr.spawn(function() return u:start("replace") end)
    local said = run({ "timeout", "30", "cat", fifo })
    assert.equal("started\n", said.stdout, "the run never reached the migration")
    assert(u:stop("replace")) -- systemd: SIGTERM to the main process (rrengine) only
    rr.wait(starting)
    local props = assert(u:properties())
    assert.equal("inactive", props.ActiveState)
    assert.equal("success", props.Result)
    local interrupted = p:last_event("INTERRUPTED")
    assert.is_truthy(interrupted, "rrengine never saw the SIGTERM")
    assert.equal("SIGTERM", interrupted.signal)
    assert.equal(0, math.tointeger(p:last_event("MIGRATION_END", "api").exit_code))
    assert.is_truthy(p:last_event("SERVICE_RESTART_SUCCESS", "api"))
    assert.not_equal(pid, p:props("api").MainPID) -- it was restarted
  end)

  it("(the same stop with KillMode=control-group leaves the migration alone too: it runs as a unit of its own)", function()
    install("control-group")
    os.remove(p.events_file)
    local u = platform.manager():unit("rrengine-restart@api.service")
    local starting = rr.spawn(function() return u:start("replace") end)
    assert.equal("started\n", run({ "timeout", "30", "cat", fifo }).stdout)
    assert(u:stop("replace"))
    rr.wait(starting)
    local ended = p:last_event("MIGRATION_END", "api")
    assert.is_truthy(ended)
    assert.is_nil(ended.error, "the migration was killed with rrengine's cgroup")
    assert.equal(0, math.tointeger(ended.exit_code))
    assert.is_truthy(p:last_event("SERVICE_RESTART_SUCCESS", "api"))
  end)

  it("the timer waits for its window and triggers its service", function()
    install()
    local t = platform.manager():unit("rrengine-restart@api.timer")
    assert(t:start("replace"))
    local res = run({ "systemctl", "--user", "show", "-p", "ActiveState,SubState,Triggers,NextElapseUSecRealtime",
      "rrengine-restart@api.timer" })
    assert(t:stop("replace"))
    assert.matches("ActiveState=active", res.stdout)
    assert.matches("SubState=waiting", res.stdout)
    assert.matches("Triggers=rrengine%-restart@api%.service", res.stdout)
    assert.matches("NextElapseUSecRealtime=Sun %d%d%d%d%-%d%d%-%d%d 03:0%d:%d%d", res.stdout)
  end)
end)
