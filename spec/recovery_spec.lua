-- An engine killed mid-run (SIGKILL: a cancelled CI job, the OOM killer) against a real
-- manager, real rsync and real processes: the next plain run refuses with exit 4 and touches
-- nothing; --recover leaves every service healthy with its files all-old or all-new; a second
-- --recover does nothing; --abandon forgets; --resume goes on with the plan.
local fs = require("rr.fs")
local helpers = require("spec.support.helpers")
local platform = require("spec.support.platform")

-- path -> sha256 of every file under dir (the service's own log left out: the service writes it).
local function tree(dir, out, prefix)
  out = out or {}
  prefix = prefix or ""
  for _, name in ipairs(fs.list(dir) or {}) do
    local path, rel = dir .. "/" .. name, prefix .. name
    local st = fs.stat(path)
    if st.type == "dir" then
      tree(path, out, rel .. "/")
    elseif name ~= "service.log" then
      out[rel] = fs.sha256(path) or "?"
    end
  end
  return out
end

local function same(a, b)
  for k, v in pairs(a) do if b[k] ~= v then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

local function body(url)
  local res = require("rr.http").get(url, { timeout = 2 })
  return res and res.body or ""
end

describe("an engine killed mid-run", function()
  local p, release, old_tree, new_tree, unit_text

  local function setup_platform(defs)
    p = platform.new(defs)
    p:start()
    release = p.dir .. "/release"
    assert(fs.mkdir_p(release .. "/lib", 493))
    helpers.write(release .. "/version", "v2\n")
    helpers.write(release .. "/app.lua", "return 'new code'\n")
    helpers.write(release .. "/lib/util.lua", "return 2\n")
    helpers.write(release .. "/added.lua", "return 'added by the deploy'\n")
    local wd = p.by_name.api.working_dir
    old_tree = tree(wd)
    new_tree = {}
    for k, v in pairs(old_tree) do new_tree[k] = v end
    for k, v in pairs(tree(release)) do new_tree[k] = v end
    unit_text = fs.read(p.by_name.api.unit_path)
  end

  -- Runs the CLI and SIGKILLs it when a progress line for `service` shows `step`. Returns the
  -- result and whether it was killed there.
  local function journal()
    return (require("rr.journal").read(p.state_root))
  end

  -- Runs the CLI and SIGKILLs it when a progress line for `service` shows `step` (or a line
  -- matches `pattern`); with `ready(journal)`, only once the run journal satisfies it (a
  -- migration's unit is journaled once systemd gave its main PID, which may come after its
  -- first output line). Returns the result and whether it was killed there.
  local function kill_at(step, args, service, pattern, ready)
    local killed, handle = false, nil
    pattern = pattern or ("^%S+%s+" .. (service or "api") .. "%s+" .. step)
    local res = p:cli(args, {
      spawned = function(h) handle = h end,
      on_line = function(_, line)
        if not killed and line:match(pattern) then
          killed = true
          -- the journal is a file: nothing signals its change, so look for a bounded while
          local deadline = require("rr").now() + 5
          while ready and not ready(journal()) and require("rr").now() < deadline do require("rr").sleep(0.01) end
          handle:kill("KILL")
        end
      end,
    })
    return res, killed
  end

  -- The service ended all-old or all-new, healthy, its process running what is on disk.
  local function assert_consistent(expect)
    local wd = p.by_name.api.working_dir
    local now = tree(wd)
    local is_old, is_new = same(now, old_tree), same(now, new_tree)
    assert.is_true(is_old or is_new, "working dir is a mix of the old and the new release")
    if expect == "old" then assert.is_true(is_old, "expected the old release") end
    if expect == "new" then assert.is_true(is_new, "expected the new release") end
    assert.equal(unit_text, fs.read(p.by_name.api.unit_path))
    assert.equal("active", p:props("api").ActiveState)
    assert.matches(is_new and "v2" or "v1", body(p.by_name.api.url))
  end

  local function assert_refused()
    local pid = p:props("api").MainPID
    local before = tree(p.by_name.api.working_dir)
    local res = p:cli({})
    assert.equal(4, res.exit_code, res.stdout .. res.stderr)
    assert.matches("interrupted", res.stderr)
    assert.matches("api: left in phase", res.stderr)
    assert.matches("plans/rolling.lua %-%-recover %-%-services " .. p.services_file:gsub("%p", "%%%0") .. " %-%-user",
      res.stderr)
    -- the read-only views show it first
    local dry = p:cli({ "--dry-run" })
    assert.equal(1, dry.exit_code, dry.stdout .. dry.stderr)
    assert.matches("^!! an earlier run was interrupted", dry.stdout)
    local stres = select(4, require("rr.proc").run({ helpers.engine, "plans/status.lua", "--user", "--services",
      p.services_file }, { env = { XDG_STATE_HOME = p.xdg_state } }))
    assert.equal(4, stres.exit_code, stres.stdout .. stres.stderr)
    assert.matches("^!! an earlier run was interrupted", stres.stdout)
    local rb = p:cli({ "--service", "api" }, { plan = "plans/rollback.lua" })
    assert.equal(4, rb.exit_code, rb.stdout .. rb.stderr)
    assert.matches("%-%-recover", rb.stderr)
    assert.equal(pid, p:props("api").MainPID, "the refused run touched the unit")
    assert.is_true(same(before, tree(p.by_name.api.working_dir)), "the refused run touched the code")
  end

  local function recover(expect_code)
    local res = p:cli({ "--recover" })
    if expect_code then assert.equal(expect_code, res.exit_code, res.stdout .. res.stderr) end
    assert.is_nil(journal(), "the journal is still there after a converged recovery")
    local again = p:cli({ "--recover" })
    assert.equal(0, again.exit_code, again.stdout .. again.stderr)
    assert.matches("nothing to recover", again.stdout)
    return res
  end

  describe("during a deploy", function()
    setup(function()
      setup_platform({ { name = "api", http = true, code = true, stabilize = 2 } })
    end)
    teardown(function() p:teardown() end)

    it("after the snapshot, before anything changed", function()
      local res, killed = kill_at("snapshot", {})
      assert.is_true(killed, res.stdout)
      assert_refused()
      recover()
      assert_consistent("old")
    end)

    it("during rsync of a large release", function()
      for i = 1, 3000 do helpers.write(("%s/many/f%04d.txt"):format(release, i), ("file %d\n"):format(i)) end
      new_tree = {}
      for k, v in pairs(old_tree) do new_tree[k] = v end
      for k, v in pairs(tree(release)) do new_tree[k] = v end
      local res, killed = kill_at("deploy", { "--service", "api", "--deploy", "--deploy-path", release })
      assert.is_true(killed, res.stdout)
      -- an rsync of the dead run may still be writing: the journal names it; end it as an
      -- operator would before recovering
      local j = assert(journal())
      for _, c in ipairs(j.services.api.children or {}) do
        os.execute(("kill -KILL %d 2>/dev/null"):format(math.tointeger(c.pid)))
      end
      assert_refused()
      recover()
      assert_consistent("old")
      fs.remove_tree(release .. "/many")
      new_tree = {}
      for k, v in pairs(old_tree) do new_tree[k] = v end
      for k, v in pairs(tree(release)) do new_tree[k] = v end
    end)

    it("during stabilization on the new release: recovery finishes it", function()
      local res, killed = kill_at("stabilize", { "--service", "api", "--deploy", "--deploy-path", release })
      assert.is_true(killed, res.stdout)
      assert.is_true(journal().services.api.verified)
      assert_refused()
      local rec = recover(0)
      assert.matches("finished on the new version", rec.stdout)
      assert_consistent("new")
      local last = p:last_event("RECOVERY_SUCCESS", "api")
      assert.equal("finished", last.action)
      -- back to v1 for the next cases, through the normal rollback plan
      local back = p:cli({ "--service", "api" }, { plan = "plans/rollback.lua" })
      assert.equal(0, back.exit_code, back.stdout .. back.stderr)
      assert_consistent("old")
    end)

    it("during the post-check of a release that never gets ready: rolled back", function()
      helpers.write(release .. "/api.control", "status=503\n")
      new_tree["api.control"] = fs.sha256(release .. "/api.control")
      local res, killed = kill_at("post%-check", { "--service", "api", "--deploy", "--deploy-path", release })
      assert.is_true(killed, res.stdout)
      assert_refused()
      recover(1)
      assert_consistent("old")
      assert.equal("rolled_back", p:last_event("RECOVERY_SUCCESS", "api").action)
    end)

    it("during a rollback, and again while --recover rolls back: it converges", function()
      helpers.write(release .. "/api.control", "status=500\n")
      new_tree["api.control"] = fs.sha256(release .. "/api.control")
      local res, killed = kill_at("rollback", { "--service", "api", "--deploy", "--deploy-path", release })
      assert.is_true(killed, res.stdout)
      assert.equal("rollback", journal().services.api.phase)
      assert_refused()
      -- --recover itself killed during its rollback
      local rres, rkilled = kill_at("rollback", { "--recover" })
      assert.is_true(rkilled, rres.stdout)
      assert.is_truthy(journal(), "a killed recovery must leave the journal")
      recover()
      assert_consistent("old")
      os.remove(release .. "/api.control")
      new_tree["api.control"] = nil
    end)

    it("--abandon forgets the interrupted run, with an event that says who", function()
      local res, killed = kill_at("snapshot", {})
      assert.is_true(killed, res.stdout .. res.stderr)
      assert_refused()
      local ab = p:cli({ "--abandon" })
      assert.equal(0, ab.exit_code, ab.stdout .. ab.stderr)
      assert.matches("forgot the interrupted run", ab.stdout)
      local ev = assert(p:last_event("RUN_ABANDONED"))
      assert.is_truthy(ev.pid)
      assert.same({ "api" }, ev.in_flight)
      assert.is_nil(journal())
      local again = p:cli({})
      assert.equal(0, again.exit_code, again.stdout .. again.stderr)
    end)
  end)

  describe("during a migration", function()
    setup(function()
      setup_platform({ { name = "api", http = true, code = true,
        migrate = { "sh", "-c", "echo migrating; exec sleep 60" } } })
    end)
    teardown(function() p:teardown() end)

    it("a migration still running from the dead run blocks recovery of its service until it ends", function()
      local res, killed = kill_at(nil, { "--service", "api", "--deploy", "--deploy-path", release }, nil,
        "api%s+| migrating", function(j)
          return j and j.services.api and j.services.api.children and #j.services.api.children > 0
        end)
      assert.is_true(killed, res.stdout)
      local j = assert(journal())
      assert.equal("started", j.services.api.migration)
      local child = assert(j.services.api.children[1], "the migration's PID is not in the journal")
      assert.matches("exec sleep 60", child.what)
      local refused = p:cli({})
      assert.equal(4, refused.exit_code)
      assert.matches(("still running from that run: pid %d"):format(child.pid), refused.stderr)
      local blocked = p:cli({ "--recover" })
      assert.equal(4, blocked.exit_code, blocked.stdout .. blocked.stderr)
      assert.is_truthy(journal(), "a blocked recovery must keep the journal")
      assert.is_true(same(tree(p.by_name.api.working_dir), new_tree), "the blocked service was touched")
      -- the migration ends (here: killed by the operator); recovery then undoes the deploy
      os.execute(("kill -KILL %d"):format(child.pid))
      recover(1)
      assert_consistent("old")
    end)
  end)

  describe("--resume", function()
    setup(function()
      setup_platform({
        { name = "api", http = true, code = true, stabilize = 2 },
        { name = "web", http = true, depends = { "api" } },
      })
    end)
    teardown(function() p:teardown() end)

    it("recovers what was in flight, then runs what the interrupted run had not done", function()
      local web_pid = p:props("web").MainPID
      local res, killed = kill_at("stabilize", {})
      assert.is_true(killed, res.stdout)
      assert.equal(web_pid, p:props("web").MainPID)
      local plain = p:cli({ "--recover" }, {})
      assert.equal(0, plain.exit_code, plain.stdout .. plain.stderr)
      assert.matches("not done by the interrupted run: web", plain.stdout)
      assert.equal(web_pid, p:props("web").MainPID, "--recover alone must not go on with the plan")
      -- once more, with --resume this time
      res, killed = kill_at("stabilize", {})
      assert.is_true(killed, res.stdout)
      local resumed = p:cli({ "--recover", "--resume" })
      assert.equal(0, resumed.exit_code, resumed.stdout .. resumed.stderr)
      assert.are_not.equal(web_pid, p:props("web").MainPID, "--resume did not restart web")
      assert.is_truthy(p:last_event("SERVICE_RESTART_SUCCESS", "web"))
      assert.is_nil(journal())
    end)
  end)
end)

describe("the manual steps of a failed rollback", function()
  local p, release
  setup(function()
    -- the migration breaks the service for good: it writes a file the deploy did not create
    -- (the service's own state, which an undo leaves alone), so the old code is unhealthy too
    p = platform.new({ { name = "api", http = true, code = true,
      migrate = { "sh", "-c", "echo status=500 > api.control" } } })
    p:start()
    release = p.dir .. "/release"
    helpers.write(release .. "/version", "v2\n")
  end)
  teardown(function() p:teardown() end)

  it("list only what is still to do, as commands that work when pasted", function()
    local res = p:cli({ "--service", "api", "--deploy", "--deploy-path", release })
    assert.equal(3, res.exit_code, res.stdout .. res.stderr)
    local ev = assert(p:last_event("ROLLBACK_FAILED", "api"))
    local steps = table.concat(ev.manual_steps, "\n")
    assert.not_matches("%-%-deploy%-record", steps, "the deploy was undone already: its undo is not a step")
    assert.not_matches("cp %-p", steps, "the definition is the known good one: nothing to copy back")
    assert.matches("^systemctl %-%-user stop " .. p.by_name.api.unit:gsub("%p", "%%%0"), ev.manual_steps[1])
    assert.matches("daemon%-reload && { systemctl %-%-user reset%-failed", steps)
    -- the steps an operator pastes, pasted (here: the fix first, as a human would)
    os.remove(p.by_name.api.working_dir .. "/api.control")
    for _, step in ipairs(ev.manual_steps) do
      if step:match("^systemctl") then
        local argv = { "sh", "-c", step }
        local ok, err, _, r = require("rr.proc").run(argv)
        assert.is_truthy(ok, "a manual step failed: " .. step .. ": " .. tostring(err) .. " " .. tostring(r and r.stderr))
      end
    end
    assert.equal("active", p:props("api").ActiveState)
  end)
end)
