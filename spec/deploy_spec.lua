-- rr.deploy: a code deploy that can be undone exactly. Real rsync, real files under a temp dir.
local rr = require("rr")
local deploy = require("rr.deploy")
local rstate = require("rr.state")
local fs = require("rr.fs")
local proc = require("rr.proc")
local helpers = require("spec.support.helpers")

-- The engine binary (for child engines), setup commands, files with their parents.
local engine, run, write = helpers.engine, helpers.run, helpers.write

-- Rewrites the start of a file in place, as SQLite or a log writer does (same inode).
local function rewrite_in_place(path, data)
  local f = assert(io.open(path, "r+b"))
  f:write(data)
  f:close()
end

-- Everything under dir: rel -> "type mode uid:gid sha256|link target" (mtimes left out:
-- rsync -a keeps them, but a directory's changes with every entry added or removed).
local function tree(dir)
  local out = {}
  local function walk(rel)
    local path = rel == "" and dir or dir .. "/" .. rel
    for _, name in ipairs(assert(fs.list(path))) do
      local r = rel == "" and name or rel .. "/" .. name
      local p = dir .. "/" .. r
      local st = assert(fs.stat(p))
      local what
      if st.type == "file" then
        what = assert(fs.sha256(p))
      elseif st.type == "link" then
        what = "-> " .. run({ "readlink", p }).stdout:gsub("\n$", "")
      else
        what = ""
      end
      out[r] = ("%s %04o %d:%d %s"):format(st.type, st.mode, st.uid, st.gid, what)
      if st.type == "dir" then walk(r) end
    end
  end
  walk("")
  return out
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

local function contains(list, value)
  for _, v in ipairs(list or {}) do
    if v == value then return true end
  end
  return false
end

describe("rr.deploy", function()
  local root, src, dst, state

  before_each(function()
    root = assert(fs.mkdtemp("/tmp/rr-deploy-spec."))
    src, dst, state = root .. "/deploy", root .. "/work", root .. "/state/run1/svc"
    assert(fs.mkdir_p(src, 493))
    assert(fs.mkdir_p(dst, 493))
  end)

  after_each(function()
    fs.remove_tree(root)
  end)

  -- A working dir with a bit of everything, and a deploy that changes each kind of thing.
  local function platform_fixture()
    -- the working dir as it runs now
    write(dst .. "/app.js", "console.log('v1')\n")
    write(dst .. "/lib/util.js", "module.exports = 1\n")
    write(dst .. "/lib/keep.js", "unchanged\n")
    write(dst .. "/bin/run", "#!/bin/sh\necho v1\n", 493)
    write(dst .. "/config/old.json", "{\"v\":1}\n", 384)
    write(dst .. "/data/app.db", "SQLITE-v1-rows-0000\n", 384)   -- the service's own file
    write(dst .. "/logs/old.log", "boot 1\n")
    write(dst .. "/mode-only.sh", "same bytes\n", 420)
    run({ "ln", "-s", "app.js", dst .. "/current" })
    write(dst .. "/link-becomes-file", "x") ; fs.remove(dst .. "/link-becomes-file")
    run({ "ln", "-s", "lib/util.js", dst .. "/link-becomes-file" })
    write(dst .. "/file-becomes-dir", "a plain file\n")
    assert(fs.mkdir_p(dst .. "/empty-dir-becomes-file", 448))
    run({ "chmod", "0700", dst .. "/lib" })
    run({ "touch", "-d", "2020-01-01", dst .. "/app.js", dst .. "/lib/util.js", dst .. "/bin/run" })

    -- the deploy path
    write(src .. "/app.js", "console.log('v2')\n")
    write(src .. "/lib/util.js", "module.exports = 2 // longer\n")
    write(src .. "/lib/keep.js", "unchanged\n")
    run({ "touch", "-r", dst .. "/lib/keep.js", src .. "/lib/keep.js" })
    write(src .. "/lib/new.js", "new file\n")
    write(src .. "/bin/run", "#!/bin/sh\necho v2\n", 493)
    write(src .. "/assets/img/logo.svg", "<svg/>\n")           -- new nested directories
    write(src .. "/mode-only.sh", "same bytes\n", 493)         -- mode change only
    run({ "touch", "-r", dst .. "/mode-only.sh", src .. "/mode-only.sh" })
    run({ "ln", "-s", "lib/new.js", src .. "/current" })       -- symlink retargeted
    write(src .. "/link-becomes-file", "now a file\n")
    write(src .. "/file-becomes-dir/inner.txt", "inside\n")
    write(src .. "/empty-dir-becomes-file", "file now\n")
    run({ "chmod", "0755", src .. "/lib" })
  end

  describe("apply then undo", function()
    it("gives back the working dir byte for byte and keeps what the service wrote since", function()
      platform_fixture()
      local before = tree(dst)

      local record, err = deploy.apply{ source = src, target = dst, state_dir = state }
      assert.is_nil(err)
      assert.equal("applied", record.state)
      -- the deploy did what rsync -a does
      local now = tree(dst)
      for rel, what in pairs(tree(src)) do
        assert.equal(what, now[rel], rel)
      end
      assert.is_true(contains(record.created, "lib/new.js"))
      assert.is_true(contains(record.created, "assets/img/logo.svg"))
      assert.is_true(contains(record.created_dirs, "assets/img"))
      assert.is_true(contains(record.replaced, "app.js"))
      assert.is_true(contains(record.replaced, "current"))
      assert.is_true(contains(record.attrs_changed, "mode-only.sh"))
      assert.is_false(contains(record.replaced, "lib/keep.js"))

      -- the service runs the new code: a new log, a new cache dir inside a dir the deploy
      -- created, its database rewritten in place
      write(dst .. "/logs/new.log", "boot 2\n")
      write(dst .. "/assets/img/cache/thumb", "generated\n")
      rewrite_in_place(dst .. "/data/app.db", "SQLITE-v1-rows-0042")

      assert.is_true(deploy.undo(record))
      local expected = {}
      for rel, what in pairs(before) do expected[rel] = what end
      expected["logs/new.log"] = tree(dst)["logs/new.log"]
      expected["data/app.db"] = tree(dst)["data/app.db"]
      for _, rel in ipairs({ "assets", "assets/img", "assets/img/cache", "assets/img/cache/thumb" }) do
        expected[rel] = tree(dst)[rel]
      end
      assert.is_not_nil(expected["assets/img/cache/thumb"], "the service's file inside a deploy-created dir")
      assert.same(expected, tree(dst))
      assert.equal("SQLITE-v1-rows-0042\n", fs.read(dst .. "/data/app.db"))
      assert.same({ "assets/img/", "assets/" }, record.undo_report.kept) -- deepest first
      assert.equal("undone", record.state)
    end)

    it("puts back a replaced file the service rewrote in place, and names it", function()
      write(dst .. "/settings.json", "{\"v\":1}\n")
      run({ "touch", "-d", "2020-01-01", dst .. "/settings.json" })
      write(src .. "/settings.json", "{\"v\":2}\n")
      local before = tree(dst)
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = state })
      -- the new code rewrites a file the deploy shipped (same inode, same size)
      rewrite_in_place(dst .. "/settings.json", "{\"v\":3}\n")
      assert.is_true(deploy.undo(record))
      assert.same(before, tree(dst))
      assert.same({ "settings.json" }, record.undo_report.changed_since_deploy)
    end)

    it("removes a created file the service changed since, and names it", function()
      write(src .. "/cache.json", "{}\n")
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = state })
      write(dst .. "/cache.json", "{\"warm\":true}\n")
      assert.is_true(deploy.undo(record))
      assert.is_false(fs.exists(dst .. "/cache.json"))
      assert.same({ "cache.json" }, record.undo_report.changed_since_deploy)
    end)

    it("says what it could not put back, and still undoes the rest", function()
      platform_fixture()
      local before = tree(dst)
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = state })
      -- the service writes into the directory that replaced a file
      write(dst .. "/file-becomes-dir/service.log", "mine\n")
      local ok, err = deploy.undo(record)
      assert.is_nil(ok)
      assert.matches("incomplete", err)
      assert.matches("file%-becomes%-dir", err)
      local now = tree(dst)
      assert.equal(before["app.js"], now["app.js"])
      assert.is_nil(now["lib/new.js"])
      assert.equal("applied", record.state) -- not marked undone: a later undo may finish it
      fs.remove_tree(dst .. "/file-becomes-dir")
      assert.is_true(deploy.undo(record))
      assert.same(before, tree(dst))
    end)

    it("is idempotent: a second undo changes nothing", function()
      platform_fixture()
      local before = tree(dst)
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = state })
      assert.is_true(deploy.undo(record))
      assert.same(before, tree(dst))
      assert.is_true(deploy.undo(record))
      assert.same(before, tree(dst))
      -- even when forced to run every step again
      assert.is_true(deploy.undo(record, { force = true }))
      assert.same(before, tree(dst))
      assert.equal("undone", assert(deploy.load(state)).state)
    end)

    it("undoes from the record on disk, in another process", function()
      platform_fixture()
      local before = tree(dst)
      assert(deploy.apply{ source = src, target = dst, state_dir = state })
      local record = assert(deploy.load(state))
      assert.equal("applied", record.state)
      assert.equal(dst, record.target)
      assert.equal(state .. "/backup", record.backup_dir)
      local code = ("local d = require('rr.deploy'); assert(d.undo(assert(d.load(%q))))"):format(state .. "\n")
      run({ engine, "-e", code })
      assert.same(before, tree(dst))
      assert.equal("undone", assert(deploy.load(state)).state)
    end)

    it("restores modes and owners that rsync changed without a backup", function()
      write(dst .. "/script.sh", "echo\n", 420)
      write(dst .. "/owned.txt", "same\n", 420)
      run({ "chown", "1234:1234", dst .. "/owned.txt" })
      write(src .. "/script.sh", "echo\n", 493)
      write(src .. "/owned.txt", "same\n", 420)
      run({ "touch", "-r", dst .. "/script.sh", src .. "/script.sh" })
      run({ "touch", "-r", dst .. "/owned.txt", src .. "/owned.txt" })
      run({ "chmod", "0750", dst })
      local before = tree(dst)
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = state })
      assert.same({}, record.backed_up)
      assert.same({ ".", "owned.txt", "script.sh" }, record.attrs_changed)
      assert.equal("file 0755 0:0", tree(dst)["script.sh"]:sub(1, 13))
      assert.equal("file 0644 0:0", tree(dst)["owned.txt"]:sub(1, 13))
      assert.equal(493, fs.stat(dst).mode) -- rsync gave the working dir the deploy dir's mode
      assert.is_true(deploy.undo(record))
      assert.same(before, tree(dst))
      assert.equal(488, fs.stat(dst).mode) -- the working dir's own mode (0750) is kept
    end)
  end)

  describe("with delete = true", function()
    it("brings back deleted files and directories, empty ones and their modes too", function()
      write(dst .. "/app.js", "v1\n")
      write(dst .. "/gone.txt", "bye\n", 384)
      write(dst .. "/old/deep/x.js", "old\n")
      run({ "chmod", "0700", dst .. "/old/deep" })
      assert(fs.mkdir_p(dst .. "/empty-old", 448))
      run({ "ln", "-s", "app.js", dst .. "/gone-link" })
      write(dst .. "/dir-becomes-file/inner", "in\n")
      write(src .. "/app.js", "v2\n")
      write(src .. "/dir-becomes-file", "a file now\n")
      local before = tree(dst)
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = state, delete = true })
      assert.same({ "app.js", "dir-becomes-file" }, sorted_keys(tree(dst)))
      assert.is_true(contains(record.deleted, "gone.txt"))
      assert.is_true(contains(record.deleted_dirs, "empty-old"))
      assert.is_true(deploy.undo(record))
      assert.same(before, tree(dst))
    end)
  end)

  describe("when rsync fails", function()
    it("refuses what its dry run already rejects, before anything changes", function()
      platform_fixture()
      -- A file in the deploy where the working dir has a non-empty directory: without
      -- --delete rsync cannot make way for it (exit 23), and its dry run says so.
      write(dst .. "/migrations/001.sql", "create table\n")
      write(src .. "/migrations", "not a directory any more\n")
      local before = tree(dst)
      local record, err = deploy.apply{ source = src, target = dst, state_dir = state }
      assert.is_nil(record)
      assert.matches("rsync dry run failed: rsync exited with code 23", err)
      assert.matches("could not make way", err)
      assert.same(before, tree(dst))
      assert.is_false(fs.exists(state .. "/deploy.json"))
    end)

    it("undoes the partial deploy before returning, when rsync fails half way: the working dir is as it was", function()
      platform_fixture()
      -- A directory rsync cannot write into, which its dry run (it creates nothing) cannot see:
      -- mode 0555, in the release too (so that rsync -a leaves it so), and the deploy run by an
      -- engine without CAP_DAC_OVERRIDE (root otherwise writes anywhere). rsync copies the
      -- rest, fails to create its temp file there and exits 23.
      write(dst .. "/locked/f.js", "old\n")
      run({ "touch", "-d", "2020-01-01", dst .. "/locked/f.js" })
      write(src .. "/locked/f.js", "new\n")
      run({ "chmod", "0555", dst .. "/locked", src .. "/locked" })
      local before = tree(dst)
      local script = ([[
        local cjson = require("cjson")
        local record, err, partial = require("rr.deploy").apply{ source = %q, target = %q, state_dir = %q }
        io.write(cjson.encode({ applied = record ~= nil, err = err or "",
          partial = partial and { created = partial.created, replaced = partial.replaced, state = partial.state } }))
      ]]):format(src, dst, state)
      local res = run({ "setpriv", "--inh-caps=-dac_override,-dac_read_search",
        "--bounding-set=-dac_override,-dac_read_search", engine, "-e", script })
      local out = require("cjson").decode(res.stdout)
      assert.is_false(out.applied)
      assert.matches("rsync failed: rsync exited with code 23", out.err)
      assert.matches("Permission denied", out.err)
      assert.matches("partial deploy was undone", out.err)
      -- rsync really had changed files before it failed
      assert.is_true(contains(out.partial.created, "lib/new.js"))
      assert.is_true(contains(out.partial.replaced, "app.js"))
      assert.equal("undone", out.partial.state)
      assert.same(before, tree(dst))
      assert.equal("undone", assert(deploy.load(state)).state)
    end)
  end)

  describe("after a crash in the middle of rsync", function()
    it("undoes from the predicted record and removes rsync's temp files", function()
      platform_fixture()
      local before = tree(dst)
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = state })
      -- What a killed engine leaves: the record still says "applying", a temp file beside a
      -- file being written.
      record.state = "applying"
      write(dst .. "/lib/.new.js.Ab12Cd", "half written")
      write(dst .. "/lib/.keepme.txt", "not rsync's")
      assert.is_true(deploy.undo(record))
      local expected = {}
      for rel, what in pairs(before) do expected[rel] = what end
      expected["lib/.keepme.txt"] = tree(dst)["lib/.keepme.txt"]
      assert.same(expected, tree(dst))
    end)
  end)

  describe("after the engine is SIGKILLed during apply", function()
    -- rsync runs in a process group of its own: a killed engine leaves it to finish (or to
    -- die on its closed output pipe). Waits until no process names `text` on its command line.
    local function wait_for_processes_naming(text)
      for _ = 1, 200 do
        local busy = false
        for _, pid in ipairs(fs.list("/proc") or {}) do
          if pid:match("^%d+$") then
            local cmdline = fs.read("/proc/" .. pid .. "/cmdline")
            if cmdline and cmdline:find(text, 1, true) then busy = true break end
          end
        end
        if not busy then return end
        rr.sleep(0.05)
      end
      error("a process still runs with " .. text)
    end

    it("undoes from the record on disk, whatever step the kill landed on", function()
      math.randomseed(os.time())
      for round = 1, 3 do
        local r_src, r_dst = ("%s/src%d"):format(root, round), ("%s/dst%d"):format(root, round)
        local r_state = ("%s/state%d"):format(root, round)
        for i = 1, 30 do
          for j = 1, 20 do
            write(("%s/d%02d/f%02d.js"):format(r_src, i, j), ("new %d %d\n"):format(i, j))
          end
        end
        local old = {}
        for i = 1, 30, 2 do
          for j = 1, 20, 3 do
            local p = ("%s/d%02d/f%02d.js"):format(r_dst, i, j)
            write(p, ("old %d %d\n"):format(i, j))
            old[#old + 1] = p
          end
        end
        for i = 1, 30 do write(("%s/gone/g%02d"):format(r_dst, i), "bye\n") end
        run({ "touch", "-d", "2020-01-01", "--", table.unpack(old) })
        local before = tree(r_dst)
        local code = ("assert(require('rr.deploy').apply{ source = %q, target = %q, state_dir = %q, delete = true })")
          :format(r_src, r_dst, r_state)
        local delay = ("%.3f"):format(0.02 + math.random() * 0.3)
        proc.run({ "timeout", "-s", "KILL", delay, engine, "-e", code }, { capture = true })
        wait_for_processes_naming(r_dst)
        local record, err = deploy.load(r_state)
        if record then
          assert.is_true(deploy.undo(record))
        else
          assert.matches("no deploy record", err) -- killed before rsync started
        end
        assert.same(before, tree(r_dst), "killed after " .. delay .. " s")
      end
    end)
  end)

  describe("checks before rsync runs", function()
    it("refuses a working dir that does not exist", function()
      local record, err = deploy.apply{ source = src, target = root .. "/nope", state_dir = state }
      assert.is_nil(record)
      assert.matches("working dir .*/nope does not exist", err)
      assert.is_false(fs.exists(state .. "/deploy.json"))
    end)

    it("refuses a source that is not a directory", function()
      write(root .. "/file", "x")
      local record, err = deploy.apply{ source = root .. "/file", target = dst, state_dir = state }
      assert.is_nil(record)
      assert.matches("deploy source .*/file is not a directory", err)
      record, err = deploy.apply{ source = root .. "/missing", target = dst, state_dir = state }
      assert.is_nil(record)
      assert.matches("deploy source .*/missing does not exist", err)
    end)

    it("refuses a state dir inside the working dir, and a used state dir", function()
      write(src .. "/a", "a")
      local record, err = deploy.apply{ source = src, target = dst, state_dir = dst .. "/.rr" }
      assert.is_nil(record)
      assert.matches("inside", err)
      assert(deploy.apply{ source = src, target = dst, state_dir = state })
      record, err = deploy.apply{ source = src, target = dst, state_dir = state }
      assert.is_nil(record)
      assert.matches("already holds a deploy record", err)
    end)

    it("raises on misuse", function()
      assert.has_error(function() deploy.apply("src") end)
      assert.has_error(function() deploy.apply{ source = src, target = dst } end)
      assert.has_error(function() deploy.undo({}) end)
      assert.has_error(function() deploy.load(nil) end)
    end)

    it("raises on a state_root that state_dir is not under (misuse)", function()
      assert.has_error(function()
        deploy.apply{ source = src, target = dst, state_dir = state, state_root = root .. "/elsewhere" }
      end)
      assert.has_error(function() deploy.apply{ source = src, target = dst, state_dir = state, state_root = 1 } end)
      assert.is_false(fs.exists(state))
    end)

    it("takes a relative state dir: the backups land there, not in the working dir", function()
      write(dst .. "/app.js", "v1\n")
      write(src .. "/app.js", "v2 longer\n")
      local cwd = assert(fs.realpath("."))
      local _, up = cwd:gsub("/[^/]+", "")
      local relative = ("../"):rep(up) .. state:sub(2)
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = relative })
      assert.equal("/", record.state_dir:sub(1, 1)) -- made absolute: rsync reads a relative one from dst
      assert.equal(state, fs.realpath(record.state_dir))
      assert.is_true(fs.exists(state .. "/backup/app.js"))
      assert.same({ "app.js" }, fs.list(dst))
      assert.is_true(deploy.undo(record))
      assert.equal("v1\n", fs.read(dst .. "/app.js"))
    end)

    it("says when there is no record", function()
      local record, err = deploy.load(root .. "/none")
      assert.is_nil(record)
      assert.matches("no deploy record", err)
    end)
  end)

  describe("rsync's quick check", function()
    it("skips a changed file with the same size and mtime unless checksum = true", function()
      write(dst .. "/same-size.txt", "AAAA\n")
      write(src .. "/same-size.txt", "BBBB\n")
      run({ "touch", "-d", "2020-01-01", dst .. "/same-size.txt", src .. "/same-size.txt" })
      local before = tree(dst)
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = state })
      assert.equal("AAAA\n", fs.read(dst .. "/same-size.txt"))
      assert.is_true(deploy.undo(record))
      record = assert(deploy.apply{ source = src, target = dst, state_dir = state .. "-2", checksum = true })
      assert.equal("BBBB\n", fs.read(dst .. "/same-size.txt"))
      assert.is_true(deploy.undo(record))
      assert.same(before, tree(dst))
    end)
  end)

  describe("pointers", function()
    it("writes, reads, moves and removes a service's inflight and last pointers", function()
      local sr = root .. "/sr"
      assert.equal(sr .. "/deploys/svc.inflight", rstate.pointer(sr, "svc", "inflight"))
      local dir, err, code = rstate.read_pointer(sr, "svc", "inflight")
      assert.is_nil(dir)
      assert.equal("ENOENT", code, err)
      assert.is_true(rstate.deploy_begin(sr, "svc", sr .. "/runs/r1/svc"))
      assert.equal(448, fs.stat(sr .. "/deploys").mode & 4095)
      assert.equal(sr .. "/runs/r1/svc", rstate.read_pointer(sr, "svc", "inflight"))
      assert.is_true(rstate.deploy_commit(sr, "svc", sr .. "/runs/r1/svc/"))
      assert.is_nil(rstate.read_pointer(sr, "svc", "inflight"))
      assert.equal(sr .. "/runs/r1/svc", rstate.read_pointer(sr, "svc", "last"))
      assert.is_true(rstate.remove_pointer(sr, "svc", "last"))
      assert.is_true(rstate.remove_pointer(sr, "svc", "last")) -- already gone: fine
      write(sr .. "/deploys/svc.last", "  \n")
      dir, err, code = rstate.read_pointer(sr, "svc", "last")
      assert.is_nil(dir)
      assert.equal("EINVAL", code, err)
      assert.has_error(function() rstate.pointer(sr, "svc", "previous") end)
      assert.has_error(function() rstate.pointer(sr, "../x", "last") end)
    end)
  end)

  describe("prune", function()
    local sr
    before_each(function() sr = root .. "/sr" end)

    -- A deploy record as apply leaves it (deploy.json and a backup), with a chosen time.
    local function record_at(run_id, service, created_at, state)
      local dir = ("%s/runs/%s/%s"):format(sr, run_id, service)
      write(dir .. "/backup/app.js", "old\n")
      local cjson = require("cjson")
      write(dir .. "/deploy.json", cjson.encode({ version = 1, source = src, target = dst, state_dir = dir,
        backup_dir = dir .. "/backup", created_at = created_at, state = state or "applied" }) .. "\n", 384)
      return dir
    end

    local function sorted(list)
      local out = { table.unpack(list) }
      table.sort(out)
      return out
    end

    it("keeps the newest records by their time, removes the rest and the run dirs left empty", function()
      -- run ids do not sort by time (they are UUIDs): the record's created_at decides
      local dirs = {}
      local ids = { "f1", "a2", "e3", "b4", "d5", "c6", "99", "00" }
      for i, id in ipairs(ids) do
        dirs[i] = record_at(id, "svc", ("2026-01-0%dT10:00:00.%03dZ"):format(i, i), "applied")
      end
      -- a second-resolution time (an older engine's record) sorts as .000 of its second
      local old_style = record_at("77", "svc", "2025-12-31T23:59:59Z", "undone")
      -- another service's record in a run dir of this one: never touched
      local other = record_at("a2", "other", "2020-01-01T00:00:00.000Z")
      local result = assert(deploy.prune(sr, "svc", { keep = 3 }))
      assert.same(sorted({ dirs[1], dirs[2], dirs[3], dirs[4], dirs[5], old_style }), sorted(result.removed))
      assert.same(sorted({ dirs[6], dirs[7], dirs[8] }), sorted(result.kept))
      for _, d in ipairs(result.kept) do assert.equal("newest", result.reasons[d]) end
      for _, d in ipairs(result.removed) do assert.is_false(fs.exists(d)) end
      assert.is_true(fs.exists(other .. "/deploy.json"))
      assert.is_true(fs.exists(sr .. "/runs/a2"))       -- still holds "other"
      assert.is_false(fs.exists(sr .. "/runs/f1"))      -- emptied: removed
      assert.is_false(fs.exists(sr .. "/runs/77"))
      assert.same(sorted({ "a2", "c6", "99", "00" }), sorted(fs.list(sr .. "/runs")))
      -- nothing more to do the second time
      result = assert(deploy.prune(sr, "svc", { keep = 3 }))
      assert.same({}, result.removed)
    end)

    it("defaults to keeping deploy.KEEP records", function()
      for i = 1, deploy.KEEP + 2 do record_at("r" .. i, "svc", ("2026-02-01T00:00:%02d.000Z"):format(i)) end
      local result = assert(deploy.prune(sr, "svc"))
      assert.same(sorted({ sr .. "/runs/r1/svc", sr .. "/runs/r2/svc" }), sorted(result.removed))
    end)

    it("never removes a record a pointer or protect names, an unfinished one, or an unreadable one", function()
      local last = record_at("r1", "svc", "2026-01-01T00:00:01.000Z", "applied")
      local inflight = record_at("r2", "svc", "2026-01-01T00:00:02.000Z", "applied")
      local given = record_at("r3", "svc", "2026-01-01T00:00:03.000Z", "undone")
      local applying = record_at("r4", "svc", "2026-01-01T00:00:04.000Z", "applying")
      local failed = record_at("r5", "svc", "2026-01-01T00:00:05.000Z", "failed")
      local plain = record_at("r6", "svc", "2026-01-01T00:00:06.000Z", "undone")
      local unreadable = sr .. "/runs/r7/svc"
      write(unreadable .. "/deploy.json", "{ torn")
      local empty = sr .. "/runs/r8/svc"   -- apply stopped before it wrote a record
      assert(fs.mkdir_p(empty, 448))
      local newest = record_at("r9", "svc", "2026-01-01T00:00:09.000Z", "applied")
      -- pointers as the flow writes them (a trailing slash and newline are fine)
      assert(rstate.write_pointer(sr, "svc", "last", last .. "/"))
      assert(rstate.write_pointer(sr, "svc", "inflight", inflight))
      local result = assert(deploy.prune(sr, "svc", { keep = 1, protect = { given } }))
      assert.same(sorted({ plain, empty }), sorted(result.removed))
      assert.equal("newest", result.reasons[newest])
      assert.equal("protected", result.reasons[last])
      assert.equal("protected", result.reasons[inflight])
      assert.equal("protected", result.reasons[given])
      assert.equal("unfinished", result.reasons[applying])
      assert.equal("unfinished", result.reasons[failed])
      assert.matches("^unreadable: ", result.reasons[unreadable])
      for _, d in ipairs({ last, inflight, given, applying, failed, newest }) do
        assert.is_true(fs.exists(d .. "/deploy.json"), d)
        assert.is_true(fs.exists(d .. "/backup/app.js"), d)
      end
      assert.is_true(fs.exists(unreadable .. "/deploy.json"))
      assert.is_false(fs.exists(sr .. "/runs/r6"))
      assert.is_false(fs.exists(sr .. "/runs/r8"))
      -- keep = 0: only what is protected, unfinished or unreadable stays
      result = assert(deploy.prune(sr, "svc", { keep = 0 }))
      assert.same(sorted({ given, newest }), sorted(result.removed))
    end)

    it("prunes real records, and an undo from a kept one still works", function()
      write(dst .. "/app.js", "v0\n")
      local before = tree(dst)
      local records = {}
      for i = 1, 3 do
        write(src .. "/app.js", ("v%d\n"):format(i))
        records[i] = assert(deploy.apply{ source = src, target = dst, checksum = true,
          state_dir = ("%s/runs/run-%d/svc"):format(sr, i) })
      end
      local result = assert(deploy.prune(sr, "svc", { keep = 1, protect = { records[1].state_dir } }))
      assert.same({ records[2].state_dir }, result.removed)
      -- undo the newest, then the oldest (protected): the working dir as before the first
      assert.is_true(deploy.undo(assert(deploy.load(records[3].state_dir))))
      assert.equal("v2\n", fs.read(dst .. "/app.js"))
      assert.is_true(deploy.undo(assert(deploy.load(records[1].state_dir))))
      assert.same(before, tree(dst))
    end)

    it("clears what a prune killed half way left, and has nothing to do without runs/", function()
      assert.same({ removed = {}, kept = {}, reasons = {} }, assert(deploy.prune(sr, "svc")))
      write(sr .. "/runs/r1/.svc.pruning/backup/x", "half removed\n")
      local keep = record_at("r2", "svc", "2026-01-01T00:00:00.000Z")
      local result = assert(deploy.prune(sr, "svc"))
      assert.same({}, result.removed)
      assert.is_false(fs.exists(sr .. "/runs/r1"))
      assert.is_true(fs.exists(keep))
    end)

    it("raises on misuse", function()
      assert.has_error(function() deploy.prune(sr, "../x") end)
      assert.has_error(function() deploy.prune(sr, "svc", { keep = -1 }) end)
      assert.has_error(function() deploy.prune(sr, "svc", { keep = 1.5 }) end)
      assert.has_error(function() deploy.prune(sr, "svc", { protect = "dir" }) end)
      assert.has_error(function() deploy.prune(sr, "svc", { protect = { 1 } }) end)
      assert.has_error(function() deploy.prune(nil, "svc") end)
    end)
  end)

  describe("verified undo", function()
    -- A release that replaces app.js (the working copy's bytes are known) and adds new.js.
    local function small_deploy()
      write(dst .. "/app.js", "console.log('v1')\n")
      write(dst .. "/lib/keep.js", "unchanged\n")
      run({ "ln", "-s", "app.js", dst .. "/current" })
      write(src .. "/app.js", "console.log('v2') // the new release\n")
      write(src .. "/lib/keep.js", "unchanged\n")
      run({ "ln", "-s", "lib/keep.js", src .. "/current" })
      write(src .. "/new.js", "new\n")
      return tree(dst)
    end

    it("records the size and sha256 of what each backup stands for before rsync runs", function()
      local before = small_deploy()
      local on_disk
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = state, checksum = true,
        -- rsync runs now: the record on disk must already hold the hashes
        on_spawn = function() on_disk = assert(deploy.load(state)) end })
      assert.equal("applying", on_disk.state)
      for _, r in ipairs({ on_disk, record, assert(deploy.load(state)) }) do
        local prior = {}
        for _, e in ipairs(r.prior) do prior[e.path] = e end
        assert.is_true(prior["app.js"].backup)
        assert.equal(18, prior["app.js"].size)
        assert.equal("integer", math.type(prior["app.js"].size))
        assert.equal(before["app.js"]:match("(%x+)$"), prior["app.js"].sha256)
        assert.equal("app.js", prior["current"].link)
        assert.is_true(prior["current"].backup)
        assert.is_nil(prior["new.js"])
      end
      assert.is_true(deploy.undo(record))
      assert.same(before, tree(dst))
      assert.same({ "app.js", "current" }, record.undo_report.restored)
      assert.same({}, record.undo_report.bad_backups)
    end)

    it("never copies a backup that does not match the record over the working dir", function()
      local before = small_deploy()
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = state, checksum = true })
      local released = fs.read(dst .. "/app.js")
      -- the backup is cut short (a full disk, a bad sector): it must not replace anything
      write(state .. "/backup/app.js", "console.lo")
      local ok, err = deploy.undo(record)
      assert.is_nil(ok)
      assert.matches(dst .. "/app.js cannot be restored: it is 37 of 18 bytes, and its backup " .. state
        .. "/backup/app.js is 10 of 18 bytes; it was not touched, put its pre-deploy version back by hand (sha256 "
        .. before["app.js"]:match("(%x+)$") .. ")", err, 1, true)
      assert.equal(released, fs.read(dst .. "/app.js"))
      assert.same({ { path = "app.js", reason = "37 of 18 bytes" } }, record.undo_report.not_restorable)
      assert.same({ path = "app.js", reason = "10 of 18 bytes",
        outcome = "the working dir's copy is not the original" }, record.undo_report.bad_backups[1])
      -- the rest is undone all the same, and the record is not marked undone
      assert.is_false(fs.exists(dst .. "/new.js"))
      assert.equal(before["current"], tree(dst)["current"])
      assert.equal("applied", record.state)
      assert.equal("applied", assert(deploy.load(state)).state)
      -- a backup of the right size with other bytes is refused too
      write(state .. "/backup/app.js", ("x"):rep(18))
      ok, err = deploy.undo(record)
      assert.is_nil(ok)
      assert.matches("is other bytes of the same size (sha256 differs)", err, 1, true)
      -- once the backup is whole again, the undo finishes
      write(state .. "/backup/app.js", "console.log('v1')\n")
      assert.is_true(deploy.undo(record))
      assert.same(before, tree(dst))
      assert.equal("undone", assert(deploy.load(state)).state)
    end)

    it("leaves a file that still holds its pre-deploy bytes, whatever its backup, and says so", function()
      local before = small_deploy()
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = state, checksum = true })
      -- as after an rsync that failed before replacing app.js: the original is in place
      write(dst .. "/app.js", "console.log('v1')\n")
      fs.remove(state .. "/backup/app.js")
      assert.is_true(deploy.undo(record))
      assert.same(before, tree(dst))
      assert.same({ "app.js" }, record.undo_report.intact)
      assert.same({ "current" }, record.undo_report.restored)
    end)

    it("checks the result before it says the deploy is undone", function()
      local before = small_deploy()
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = state, checksum = true })
      -- the new app.js cannot be replaced (immutable): the restore fails, and so does the check
      run({ "chattr", "+i", dst .. "/app.js" })
      local ok, err = deploy.undo(record)
      run({ "chattr", "-i", dst .. "/app.js" })
      assert.is_nil(ok)
      assert.matches("cannot put back " .. dst .. "/app.js from " .. state .. "/backup/app.js: ", err, 1, true)
      assert.matches("after the undo " .. dst .. "/app.js is 37 of 18 bytes, not what it was before the deploy",
        err, 1, true)
      assert.equal("applied", record.state)
      assert.is_true(deploy.undo(record))
      assert.same(before, tree(dst))
    end)

    it("undoes a record written before hashes were recorded only when its rsync had finished", function()
      local before = small_deploy()
      local record = assert(deploy.apply{ source = src, target = dst, state_dir = state, checksum = true })
      -- the record as an older rrengine wrote it: version 1, no hashes
      local function as_version_1(r, rsync_finished)
        local old = require("cjson").decode(require("cjson").encode(r))
        old.version = 1
        for _, e in ipairs(old.prior) do e.backup, e.size, e.sha256, e.link = nil, nil, nil, nil end
        if not rsync_finished then old.applied_at, old.state = nil, "failed" end
        write(state .. "/deploy.json", require("cjson").encode(old) .. "\n", 384)
        return assert(deploy.load(state))
      end
      local failed = as_version_1(record, false)
      local ok, err = deploy.undo(failed)
      assert.is_nil(ok)
      assert.matches(dst .. "/app.js cannot be restored: rsync failed, and the record has no hash to verify its backup",
        err, 1, true)
      assert.equal("console.log('v2') // the new release\n", fs.read(dst .. "/app.js"))
      local applied = as_version_1(record, true)
      assert.is_true(deploy.undo(applied))
      assert.same(before, tree(dst))
      assert.same({ "app.js", "current" }, applied.undo_report.unverified)
    end)
  end)

  describe("itemized output", function()
    it("parses rsync's escapes and item kinds", function()
      local p = deploy._parse_item
      assert.same({ action = "created", dir = false, path = "new\nline" }, p(">f+++++++++ new\\#012line"))
      assert.same({ action = "created", dir = false, path = "bs\\#041" }, p(">f+++++++++ bs\\#134#041"))
      assert.same({ action = "created", dir = true, path = "a b" }, p("cd+++++++++ a b/"))
      assert.same({ action = "deleted", dir = true, path = "old" }, p("*deleting   old/"))
      assert.same({ action = "deleted", dir = false, path = "x -> y" }, p("*deleting   x -> y"))
      assert.same({ action = "changed", dir = false, path = "f" }, p(">f..t...... f"))
      assert.same({ action = "changed", dir = false, path = "l" }, p("cLc.t...... l"))
      assert.same({ action = "attrs", dir = false, path = "m" }, p(".f...p..... m"))
      assert.same({ action = "attrs", dir = true, path = "." }, p(".d..t...... ./"))
      assert.is_nil(p("created directory /x"))
      assert.is_nil(p(""))
    end)
  end)
end)
