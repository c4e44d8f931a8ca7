-- rr.snapshot: known-good snapshots of a unit's definition. Real files under a temp dir.
local snapshot = require("rr.snapshot")
local fs = require("rr.fs")
local proc = require("rr.proc")
local helpers = require("spec.support.helpers")

-- The engine binary (for child engines), setup commands, files with their parents.
local engine, run, write = helpers.engine, helpers.run, helpers.write

-- path -> "mode sha256" of each file that exists, for byte-and-mode comparisons.
local function state_of(paths)
  local out = {}
  for _, p in ipairs(paths) do
    local st = fs.stat(p, true)
    if st then out[p] = ("%04o %d:%d %s"):format(st.mode, st.uid, st.gid, assert(fs.sha256(p))) end
  end
  return out
end

local function changes_by_path(changes)
  local out = {}
  for _, c in ipairs(changes) do out[c.path] = c.change end
  return out
end

local function sorted(list)
  local out = { table.unpack(list) }
  table.sort(out)
  return out
end

local UNIT_V1 = [[
[Unit]
Description=SSO API

[Service]
ExecStart=/usr/bin/node server.js
EnvironmentFile=/etc/sso/api.env
EnvironmentFile=-/etc/sso/api.local.env
Restart=on-failure
]]

describe("rr.snapshot", function()
  local root, state_root, unit, dropin_dir, dropin, envfile, optenv, files, all_paths

  before_each(function()
    root = assert(fs.mkdtemp("/tmp/rr-snapshot-spec."))
    state_root = root .. "/state"
    unit = root .. "/units/sso-api.service"
    dropin_dir = root .. "/units/sso-api.service.d"
    dropin = dropin_dir .. "/10-limits.conf"
    envfile = root .. "/etc/api.env"
    optenv = root .. "/etc/api.local.env"
    write(unit, UNIT_V1, 420)
    write(dropin, "[Service]\nLimitNOFILE=65536\n", 420)
    write(envfile, "PORT=3001\nSECRET=s3cr3t\n", 384)
    -- the files as the flow hands them over (FragmentPath, DropInPaths, EnvironmentFiles)
    files = {
      { path = unit, role = "unit" },
      { path = dropin, role = "dropin" },
      { path = envfile, role = "envfile" },
      { path = optenv, role = "envfile", optional = true },
    }
    all_paths = { unit, dropin, envfile, optenv, dropin_dir .. "/20-debug.conf" }
  end)

  after_each(function()
    fs.remove_tree(root)
  end)

  describe("capture, promote, known_good", function()
    it("stores a candidate with hashes, modes and the run id; promote makes it known good", function()
      assert.is_nil(snapshot.known_good(state_root, "sso.api"))
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "run-1" }))
      assert.equal("run-1", snap.run)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT", snap.created)
      assert.equal(state_root .. "/snapshots/sso.api/" .. snap.name, snap.dir)
      assert.equal(4, #snap.files)
      assert.same({ path = unit, role = "unit", optional = false, stored = "01.unit", mode = 420,
        uid = 0, gid = 0, size = #UNIT_V1, sha256 = fs.sha256(unit) }, snap.files[1])
      assert.equal(384, snap.files[3].mode)
      assert.is_true(snap.files[4].absent)
      assert.equal(UNIT_V1, fs.read(snap.dir .. "/01.unit"))
      assert.equal(fs.sha256(envfile), fs.sha256(snap.dir .. "/03.envfile"))
      assert.equal(384, fs.stat(snap.dir .. "/03.envfile").mode) -- a secret stays private

      -- a candidate is not the known-good one until promoted
      assert.is_nil(snapshot.known_good(state_root, "sso.api"))
      assert(snapshot.promote(state_root, "sso.api", snap))
      local good = assert(snapshot.known_good(state_root, "sso.api"))
      assert.equal(snap.name, good.name)
      assert.equal(snap.dir, good.dir)
      assert.equal("run-1", good.run)
      assert.same(snap.files, good.files)
    end)

    it("keeps the known-good one until a newer one is promoted", function()
      local one = assert(snapshot.capture(state_root, "sso.api", files, { run = "r1" }))
      assert(snapshot.promote(state_root, "sso.api", one))
      write(unit, UNIT_V1 .. "Environment=DEBUG=1\n")
      local two = assert(snapshot.capture(state_root, "sso.api", files, { run = "r2" }))
      assert.equal(one.name, snapshot.known_good(state_root, "sso.api").name)
      assert(snapshot.promote(state_root, "sso.api", two))
      assert.equal(two.name, snapshot.known_good(state_root, "sso.api").name)
    end)

    it("fails on a missing file that is not optional, and leaves nothing behind", function()
      fs.remove(envfile)
      local snap, err = snapshot.capture(state_root, "sso.api", files, { run = "r" })
      assert.is_nil(snap)
      assert.matches("cannot snapshot .*api.env", err)
      assert.same({}, snapshot.list(state_root, "sso.api"))
      assert.same({}, fs.list(state_root .. "/snapshots/sso.api"))
    end)

    it("stores a symlinked unit file as the bytes systemd reads", function()
      local real = root .. "/opt/sso-api.service"
      write(real, UNIT_V1)
      fs.remove(unit)
      run({ "ln", "-s", real, unit })
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      assert.equal(real, snap.files[1].link)
      assert.equal(UNIT_V1, fs.read(snap.dir .. "/01.unit"))
      -- the target is edited: restore writes through the link, which stays a link
      write(real, "[Service]\nExecStart=/bin/false\n")
      local result = assert(snapshot.restore(snap, files))
      assert.same({ unit }, result.restored)
      assert.equal("link", fs.stat(unit).type)
      assert.equal(UNIT_V1, fs.read(real))
    end)

    it("never writes through a link that leads elsewhere now (a mask to /dev/null)", function()
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      fs.remove(dropin)
      run({ "ln", "-s", "/dev/null", dropin })
      local result = assert(snapshot.restore(snap, files))
      assert.same({ dropin }, result.restored)
      assert.equal("file", fs.stat(dropin).type)
      assert.equal("[Service]\nLimitNOFILE=65536\n", fs.read(dropin))
      assert.equal("other", fs.stat("/dev/null", true).type)
    end)

    it("raises on misuse", function()
      assert.has_error(function() snapshot.capture(state_root, "../etc", files, {}) end)
      assert.has_error(function() snapshot.capture(state_root, "sso.api", { { path = "rel", role = "unit" } }) end)
      assert.has_error(function() snapshot.capture(state_root, "sso.api", { { path = unit, role = "x" } }) end)
      assert.has_error(function() snapshot.promote(state_root, "sso.api", {}) end)
      assert.has_error(function() snapshot.diff(nil, {}) end)
    end)
  end)

  -- The operator's edits before the run: a new ExecStart flag, a new drop-in, a deleted env
  -- file, a new optional env file, a drop-in's mode.
  local function edit_everything()
    write(unit, (UNIT_V1:gsub("server.js", "server.js --experimental")))
    write(dropin_dir .. "/20-debug.conf", "[Service]\nEnvironment=DEBUG=*\n")
    assert(fs.remove(envfile))
    write(optenv, "EXTRA=1\n")
    run({ "chmod", "0600", dropin })
  end

  local function current_files()
    return {
      { path = unit, role = "unit" },
      { path = dropin, role = "dropin" },
      { path = dropin_dir .. "/20-debug.conf", role = "dropin" },
      { path = envfile, role = "envfile" },
      { path = optenv, role = "envfile", optional = true },
    }
  end

  describe("diff", function()
    it("is empty when nothing changed", function()
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      assert.same({}, snapshot.diff(snap, files))
    end)

    it("lists modified, added and removed files", function()
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      edit_everything()
      local changes = snapshot.diff(snap, current_files())
      assert.same({
        [unit] = "modified",
        [dropin] = "modified",
        [envfile] = "removed",
        [optenv] = "added",
        [dropin_dir .. "/20-debug.conf"] = "added",
      }, changes_by_path(changes))
      for _, c in ipairs(changes) do
        if c.path == dropin then assert.equal("mode", c.detail) end
        if c.path == unit then assert.equal("content", c.detail) end
      end
    end)

    it("sees a drop-in deleted since even when systemd no longer lists it", function()
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      fs.remove_tree(dropin_dir)
      local now = { files[1], files[3], files[4] }
      assert.same({ [dropin] = "removed" }, changes_by_path(snapshot.diff(snap, now)))
      local result = assert(snapshot.restore(snap, now))
      assert.same({ dropin }, result.restored)
      assert.equal("[Service]\nLimitNOFILE=65536\n", fs.read(dropin))
    end)
  end)

  describe("restore", function()
    it("brings back exactly the snapshot, touching only what differs", function()
      local before = state_of(all_paths)
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      assert(snapshot.promote(state_root, "sso.api", snap))
      edit_everything()
      local good = assert(snapshot.known_good(state_root, "sso.api"))
      local result = assert(snapshot.restore(good, current_files()))
      assert.same(sorted({ unit, dropin, envfile }), sorted(result.restored))
      assert.same(sorted({ optenv, dropin_dir .. "/20-debug.conf" }), sorted(result.removed))
      assert.same(before, state_of(all_paths))
      assert.equal(384, fs.stat(envfile).mode)
      -- nothing differs any more: a second restore touches nothing
      local again = assert(snapshot.restore(good, current_files()))
      assert.same({ restored = {}, removed = {}, kept = {}, manual = {} }, again)
    end)

    it("leaves an unchanged file's inode alone", function()
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      local ino = fs.stat(envfile).ino
      write(unit, "[Service]\nExecStart=/bin/false\n")
      local result = assert(snapshot.restore(snap, files))
      assert.same({ unit }, result.restored)
      assert.equal(ino, fs.stat(envfile).ino)
    end)

    it("keeps an env file the unit started to name that existed before the snapshot", function()
      local shared = root .. "/etc/platform.env"
      write(shared, "REGION=eu\n")
      run({ "touch", "-d", "2020-01-01", shared })
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      local fresh = root .. "/etc/fresh.env"
      write(fresh, "NEW=1\n")
      local now = { files[1], files[2], files[3],
        { path = shared, role = "envfile" }, { path = fresh, role = "envfile" } }
      local result = assert(snapshot.restore(snap, now))
      assert.same({ shared }, result.kept)
      assert.same({ fresh }, result.removed)
      assert.is_true(fs.exists(shared))
      assert.is_false(fs.exists(fresh))
    end)
  end)

  -- Drop-ins other units read too: the global service.d/, prefix dirs (unit names split at
  -- '-'), a template's dir, vendor files. One service's rollback must leave them alone.
  describe("shared drop-ins", function()
    local units_dir, own_dir
    before_each(function()
      units_dir = root .. "/units"
      own_dir = dropin_dir
    end)

    it("restore leaves shared and prefix drop-ins added since alone, and removes an own one", function()
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r", unit = "sso-api.service" }))
      assert.equal("sso-api.service", snap.unit)
      local global = write(units_dir .. "/service.d/50-all.conf", "[Service]\nLimitNOFILE=4096\n")
      local prefix = write(units_dir .. "/sso-.service.d/10-prefix.conf", "[Service]\nNice=5\n")
      local own = write(own_dir .. "/20-debug.conf", "[Service]\nEnvironment=DEBUG=*\n")
      local before = state_of({ global, prefix })
      -- what systemd would list now: the unit file, the global and prefix drop-ins, its own
      local now = { files[1], { path = global, role = "dropin" }, { path = prefix, role = "dropin" }, files[2],
        { path = own, role = "dropin" }, files[3], files[4] }

      local by_path = {}
      for _, c in ipairs(snapshot.diff(snap, now)) do by_path[c.path] = c end
      assert.same({ path = global, role = "dropin", change = "added", shared = true, scope = "shared" }, by_path[global])
      assert.same({ path = prefix, role = "dropin", change = "added", shared = true, scope = "shared" }, by_path[prefix])
      assert.same({ path = own, role = "dropin", change = "added" }, by_path[own])

      local result = assert(snapshot.restore(snap, now))
      assert.same({ own }, result.removed)
      assert.same(sorted({ global, prefix }), sorted(result.manual))
      assert.same({}, result.restored)
      assert.is_false(fs.exists(own))
      assert.same(before, state_of({ global, prefix }))
    end)

    it("restore neither overwrites nor re-creates a shared drop-in that changed since", function()
      local global = write(units_dir .. "/service.d/50-all.conf", "[Service]\nLimitNOFILE=4096\n")
      local prefix = write(units_dir .. "/sso-.service.d/10-prefix.conf", "[Service]\nNice=5\n")
      local with_shared = { files[1], { path = global, role = "dropin" }, { path = prefix, role = "dropin" },
        files[2], files[3], files[4] }
      local snap = assert(snapshot.capture(state_root, "sso.api", with_shared, { run = "r", unit = "sso-api.service" }))
      write(global, "[Service]\nLimitNOFILE=1024\n") -- another team's change, for every service
      fs.remove(prefix)
      write(dropin, "[Service]\nLimitNOFILE=1\n")   -- this service's own drop-in, broken
      local changes = {}
      for _, c in ipairs(snapshot.diff(snap, { files[1], { path = global, role = "dropin" }, files[2] })) do
        changes[c.path] = ("%s %s"):format(c.change, tostring(c.shared))
      end
      assert.same({ [global] = "modified true", [prefix] = "removed true", [dropin] = "modified nil" }, changes)
      local result = assert(snapshot.restore(snap, { files[1], { path = global, role = "dropin" }, files[2] }))
      assert.same({ dropin }, result.restored)
      assert.same(sorted({ global, prefix }), sorted(result.manual))
      assert.equal("[Service]\nLimitNOFILE=1024\n", fs.read(global))
      assert.is_false(fs.exists(prefix))
      assert.equal("[Service]\nLimitNOFILE=65536\n", fs.read(dropin))
    end)

    it("takes the unit name from the unit file when the snapshot has none (older manifests)", function()
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      assert.is_nil(snap.unit)
      local global = write(units_dir .. "/service.d/50-all.conf", "x\n")
      local own = write(own_dir .. "/30-new.conf", "y\n")
      local result = assert(snapshot.restore(snap, { files[1], { path = global, role = "dropin" },
        { path = own, role = "dropin" } }))
      assert.same({ own }, result.removed)
      assert.same({ global }, result.manual)
      -- opts.unit names it explicitly: then only that unit's dir is own
      write(own, "y\n")
      result = assert(snapshot.restore(snap, { { path = own, role = "dropin" } }, { unit = "other.service" }))
      assert.same({ own }, result.manual)
      assert.is_true(fs.exists(own))
    end)

    it("treats a template's dir as shared by its instances, and an instance's dir as its own", function()
      local template = write(units_dir .. "/worker@.service", "[Service]\nExecStart=/bin/worker %i\n")
      local mine = units_dir .. "/worker@a.service.d/10-a.conf"
      local all = units_dir .. "/worker@.service.d/10-all.conf"
      local tfiles = { { path = template, role = "unit" } }
      for _, unit_name in ipairs({ "worker@a.service", false }) do -- named, then derived from worker@.service
        fs.remove_tree(state_root)
        local snap = assert(snapshot.capture(state_root, "worker.a", tfiles,
          { run = "r", unit = unit_name or nil }))
        write(mine, "[Service]\nNice=1\n")
        write(all, "[Service]\nNice=2\n")
        local result = assert(snapshot.restore(snap, { tfiles[1], { path = all, role = "dropin" },
          { path = mine, role = "dropin" } }))
        assert.same({ mine }, result.removed)
        assert.same({ all }, result.manual)
        assert.is_true(fs.exists(all))
      end
    end)

    it("replaces an own drop-in linked to a conf elsewhere by a file, never writing through", function()
      local common = write(root .. "/common/limits.conf", "[Service]\nLimitNOFILE=65536\n")
      fs.remove(dropin)
      run({ "ln", "-s", common, dropin })
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r", unit = "sso-api.service" }))
      assert.equal(common, snap.files[2].link)
      write(common, "[Service]\nLimitNOFILE=1\n") -- changed for every unit that links it
      local result = assert(snapshot.restore(snap, files))
      assert.same({ dropin }, result.restored)
      assert.equal("file", fs.stat(dropin).type)
      assert.equal("[Service]\nLimitNOFILE=65536\n", fs.read(dropin))
      assert.equal("[Service]\nLimitNOFILE=1\n", fs.read(common))
    end)

    it("dropin_scope: own, shared, vendor", function()
      local u = "lilith-sso-api.service"
      assert.equal("own", snapshot.dropin_scope("/etc/systemd/system/lilith-sso-api.service.d/a.conf", u))
      assert.equal("own", snapshot.dropin_scope("/run/systemd/system.control/lilith-sso-api.service.d/50-x.conf", u))
      assert.equal("shared", snapshot.dropin_scope("/etc/systemd/system/service.d/a.conf", u))
      assert.equal("shared", snapshot.dropin_scope("/etc/systemd/system/lilith-.service.d/a.conf", u))
      assert.equal("shared", snapshot.dropin_scope("/etc/systemd/system/lilith-sso-.service.d/a.conf", u))
      assert.equal("shared", snapshot.dropin_scope("/etc/systemd/system/lilith-sso-api.service.d/a.conf", nil))
      assert.equal("vendor", snapshot.dropin_scope("/usr/lib/systemd/system/lilith-sso-api.service.d/a.conf", u))
      assert.equal("vendor", snapshot.dropin_scope("/lib/systemd/system/lilith-sso-api.service.d/a.conf", u))
      assert.equal("generated", snapshot.dropin_scope("/run/systemd/generator.late/lilith-sso-api.service.d/a.conf", u))
      assert.equal("generated", snapshot.dropin_scope("/run/user/0/systemd/generator/lilith-sso-api.service.d/a.conf", u))
      assert.equal("own", snapshot.dropin_scope("/etc/systemd/system/w@a.service.d/x.conf", "w@a.service"))
      assert.equal("shared", snapshot.dropin_scope("/etc/systemd/system/w@.service.d/x.conf", "w@a.service"))
      assert.has_error(function() snapshot.capture(state_root, "sso.api", files, { unit = 7 }) end)
      assert.has_error(function() snapshot.capture(state_root, "sso.api", files, { unit = "a/b.service" }) end)
      assert.has_error(function() snapshot.restore({ files = {}, dir = "/x" }, {}, { unit = 1 }) end)
    end)
  end)

  describe("unified_diff", function()
    it("shows the change from the known-good file to the file now", function()
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "run-7" }))
      assert.equal("", snapshot.unified_diff(snap, unit))
      write(unit, (UNIT_V1:gsub("server.js", "server.js --experimental")))
      assert.equal(table.concat({
        "--- " .. unit .. "\t(known good, run run-7)\n",
        "+++ " .. unit .. "\t(now)\n",
        "@@ -2,7 +2,7 @@\n",
        " Description=SSO API\n",
        " \n",
        " [Service]\n",
        "-ExecStart=/usr/bin/node server.js\n",
        "+ExecStart=/usr/bin/node server.js --experimental\n",
        " EnvironmentFile=/etc/sso/api.env\n",
        " EnvironmentFile=-/etc/sso/api.local.env\n",
        " Restart=on-failure\n",
      }), snapshot.unified_diff(snap, unit))
    end)

    it("shows added and removed files against /dev/null, and separate hunks", function()
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      fs.remove(dropin)
      assert.equal("--- " .. dropin .. "\t(known good, run r)\n+++ /dev/null\t(now)\n"
        .. "@@ -1,2 +0,0 @@\n-[Service]\n-LimitNOFILE=65536\n", snapshot.unified_diff(snap, dropin))
      local added = dropin_dir .. "/20-debug.conf"
      write(added, "[Service]\nEnvironment=DEBUG=*")
      assert.equal("--- /dev/null\t(known good, run r)\n+++ " .. added .. "\t(now)\n"
        .. "@@ -0,0 +1,2 @@\n+[Service]\n+Environment=DEBUG=*\n\\ No newline at end of file\n",
        snapshot.unified_diff(snap, added))

      local lines = {}
      for i = 1, 20 do lines[i] = "L" .. i end
      local long = table.concat(lines, "\n") .. "\n"
      write(unit, long)
      local snap2 = assert(snapshot.capture(state_root, "sso.api", { files[1] }, { run = "r" }))
      lines[2], lines[19] = "two", "nineteen"
      table.insert(lines, 10, "inserted")
      write(unit, table.concat(lines, "\n") .. "\n")
      local text = snapshot.unified_diff(snap2, unit)
      local hunks = {}
      for h in text:gmatch("@@ [^\n]* @@") do hunks[#hunks + 1] = h end
      assert.same({ "@@ -1,5 +1,5 @@", "@@ -7,6 +7,7 @@", "@@ -16,5 +17,5 @@" }, hunks)
      assert.matches("\n%-L2\n%+two\n", text)
      assert.matches("\n%+inserted\n", text)
    end)
    it("diffs a file absent at capture from /dev/null; an empty one is the header alone", function()
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      write(optenv, "DEBUG=1\n")
      assert.equal("--- /dev/null\t(known good, run r)\n+++ " .. optenv .. "\t(now)\n@@ -0,0 +1 @@\n+DEBUG=1\n",
        snapshot.unified_diff(snap, optenv))
      write(optenv, "")
      assert.equal("--- /dev/null\t(known good, run r)\n+++ " .. optenv .. "\t(now)\n",
        snapshot.unified_diff(snap, optenv))
      fs.remove(optenv)
      assert.equal("", snapshot.unified_diff(snap, optenv))
    end)

    it("follows a symlink on disk; a dangling one is a file that is gone", function()
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      local target = root .. "/elsewhere.service"
      write(target, UNIT_V1 .. "Nice=5\n")
      fs.remove(unit)
      assert(proc.run({ "ln", "-s", target, unit }))
      assert.matches("\n%+Nice=5\n$", snapshot.unified_diff(snap, unit))
      fs.remove(target)
      assert.matches("^%-%-%- " .. unit:gsub("%p", "%%%0") .. "\t%(known good, run r%)\n%+%+%+ /dev/null\t%(now%)\n",
        snapshot.unified_diff(snap, unit))
    end)

    it("says that binary files differ, in one line", function()
      write(unit, "[Service]\0\n")
      local snap = assert(snapshot.capture(state_root, "sso.api", { files[1] }, { run = "r" }))
      write(unit, "[Service]\0Nice=5\n")
      assert.equal(("Binary files %s\t(known good, run r) and %s\t(now) differ\n"):format(unit, unit),
        snapshot.unified_diff(snap, unit))
    end)

    it("cuts a long diff, and says how to see all of it", function()
      local function numbered(prefix, n)
        local lines = {}
        for i = 1, n do lines[i] = prefix .. i end
        return table.concat(lines, "\n") .. "\n"
      end
      write(unit, numbered("old ", 400))
      local snap = assert(snapshot.capture(state_root, "sso.api", { files[1] }, { run = "r" }))
      write(unit, numbered("new ", 400))
      local stored = snap.dir .. "/" .. snap.files[1].stored
      local text = assert(snapshot.unified_diff(snap, unit, { max_lines = 10 }))
      local lines = {}
      for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
      assert.equal(11, #lines)
      assert.equal("@@ -1,400 +1,400 @@", lines[3])
      assert.equal("-old 7", lines[10])
      assert.equal(("... (diff cut at 10 lines; all of it: diff -u %s %s)"):format(stored, unit), lines[11])
      -- the default cap: 803 lines of diff (2 headers, 1 hunk header, 800 changes)
      text = assert(snapshot.unified_diff(snap, unit))
      local count = select(2, text:gsub("\n", ""))
      assert.equal(snapshot.DIFF_MAX_LINES + 1, count)
      assert.matches("\n%.%.%. %(diff cut at " .. snapshot.DIFF_MAX_LINES .. " lines; ", text)
    end)

    it("refuses what is not a regular file, and a stored copy that is gone", function()
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      fs.remove(dropin)
      assert(fs.mkdir_p(dropin, 493))
      assert.same({ nil, ("cannot diff %s: it is a dir, not a regular file"):format(dropin), "EINVAL" },
        { snapshot.unified_diff(snap, dropin) })
      local stored = snap.dir .. "/" .. snap.files[1].stored
      assert(fs.remove(stored))
      assert.same({ nil, ("cannot diff %s against its known-good copy: diff: %s: No such file or directory")
        :format(unit, stored), "EIO" }, { snapshot.unified_diff(snap, unit) })
    end)

    it("raises on misuse", function()
      local snap = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" }))
      assert.has_error(function() snapshot.unified_diff({}, unit) end, "rr.snapshot.unified_diff: snap must be a snapshot")
      assert.has_error(function() snapshot.unified_diff(snap, 7) end, "rr.snapshot.unified_diff: path must be a string")
      assert.has_error(function() snapshot.unified_diff(snap, unit, { max_lines = 0 }) end,
        "rr.snapshot.unified_diff: opts.max_lines must be an integer >= 1")
    end)
  end)

  describe("unified_diff against patch(1)", function()
    it("produces diffs that patch applies to give the file now", function()
      math.randomseed(7)
      local words = { "[Service]", "ExecStart=/bin/app", "Restart=always", "", "User=app", "Environment=A=1" }
      local function random_text(n)
        local lines = {}
        for i = 1, n do lines[i] = words[math.random(#words)] .. (math.random(4) == 1 and " " .. i or "") end
        return table.concat(lines, "\n") .. (math.random(3) == 1 and "" or "\n")
      end
      for case = 1, 40 do
        local old = random_text(math.random(0, 30))
        local new
        if case % 2 == 0 then
          -- small edits of old
          local lines = {}
          for line in (old .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
          for _ = 1, math.random(1, 4) do
            local at = math.random(1, #lines + 1)
            local what = math.random(3)
            if what == 1 then table.insert(lines, at, "inserted " .. at)
            elseif what == 2 and lines[at] then table.remove(lines, at)
            elseif lines[at] then lines[at] = "changed " .. at end
          end
          new = table.concat(lines, "\n")
        else
          new = random_text(math.random(0, 30))
        end
        write(unit, old)
        local snap = assert(snapshot.capture(state_root, "diff.svc", { { path = unit, role = "unit" } }, { run = "r" }))
        write(unit, new)
        local text = assert(snapshot.unified_diff(snap, unit))
        if old == new then
          assert.equal("", text)
        else
          write(root .. "/old", old)
          write(root .. "/change.patch", text)
          fs.remove(root .. "/patched")
          run({ "patch", "-s", "-o", root .. "/patched", root .. "/old", root .. "/change.patch" })
          assert.equal(new, fs.read(root .. "/patched"), text)
        end
      end
    end)
  end)

  describe("crash safety", function()
    it("ignores half-written and half-removed snapshot dirs, and the next capture clears them", function()
      local good = assert(snapshot.capture(state_root, "sso.api", files, { run = "good" }))
      assert(snapshot.promote(state_root, "sso.api", good))
      local dir = state_root .. "/snapshots/sso.api"
      -- what a SIGKILL leaves: a .tmp dir without its manifest, one with a torn copy, and a
      -- pruned dir half removed
      write(dir .. "/000050-dead.tmp/01.unit", "[Serv")
      write(dir .. "/000051-dead2.tmp/manifest.json", "{\"version\":1,\"files\":[")
      write(dir .. "/000001-old.trash/02.dropin", "x")
      assert.equal(good.name, snapshot.known_good(state_root, "sso.api").name)
      assert.equal(1, #snapshot.list(state_root, "sso.api"))

      local later = assert(snapshot.capture(state_root, "sso.api", files, { run = "after" }))
      assert.equal("000002-after", later.name) -- numbered after what is left
      assert.same(sorted({ good.name, later.name, "current" }), sorted(fs.list(dir)))
    end)

    it("leaves a complete known-good snapshot whenever the engine is killed", function()
      -- A child engine captures and promotes version after version of the unit and env file;
      -- it is SIGKILLed at random moments. After each kill the known-good snapshot must load,
      -- match its hashes and hold one whole version (unit and env file of the same one).
      local child = [[
        local snapshot, fs = require("rr.snapshot"), require("rr.fs")
        local state_root, unit, env, from = ...
        from = math.tointeger(tonumber(from))
        local files = { { path = unit, role = "unit" }, { path = env, role = "envfile" } }
        for v = from, from + 10000 do
          assert(fs.write_atomic(unit, "[Service]\nExecStart=/bin/app --version " .. v .. "\n"))
          assert(fs.write_atomic(env, "VERSION=" .. v .. "\n"))
          local snap = assert(snapshot.capture(state_root, "crash.svc", files, { run = "v" .. v }))
          assert(snapshot.promote(state_root, "crash.svc", snap))
        end
      ]]
      local script = root .. "/child.lua"
      write(script, child)
      math.randomseed(os.time())
      local seen_versions, last = {}, 0
      for round = 1, 12 do
        local delay = ("%.3f"):format(0.05 + math.random() * 0.25)
        local res, err, _, r = proc.run({ "timeout", "-s", "KILL", delay, engine, script,
          state_root, unit, envfile, tostring(round * 100000) }, { capture = true })
        assert.is_nil(res, "the child was meant to be killed")
        -- timeout(1) sends KILL to its whole process group, itself included
        assert.is_true(r.signal == "SIGKILL" or r.exit_code == 137, err .. " " .. tostring(r.stderr))
        local good = snapshot.known_good(state_root, "crash.svc")
        if good then
          local unit_text = assert(fs.read(good.dir .. "/" .. good.files[1].stored))
          local env_text = assert(fs.read(good.dir .. "/" .. good.files[2].stored))
          for _, e in ipairs(good.files) do
            assert.equal(e.sha256, fs.sha256(good.dir .. "/" .. e.stored))
          end
          local v = unit_text:match("%-%-version (%d+)\n$")
          assert.is_not_nil(v, unit_text)
          assert.equal("VERSION=" .. v .. "\n", env_text)
          assert.equal("v" .. v, good.run)
          -- never an older one than before: the previous known-good stays until replaced
          assert.is_true(tonumber(v) >= last)
          last = tonumber(v)
          seen_versions[v] = true
        end
      end
      assert.is_not_nil(next(seen_versions), "no kill landed after a promote")
      -- a normal capture afterwards clears every leftover and prunes to KEEP (+ known good)
      local files2 = { { path = unit, role = "unit" } }
      assert(snapshot.capture(state_root, "crash.svc", files2, { run = "final" }))
      local names = fs.list(state_root .. "/snapshots/crash.svc")
      for _, n in ipairs(names) do
        assert.is_nil(n:match("%.tmp$") or n:match("%.trash$") or n:match("^%.current%."), n)
      end
      assert.is_true(#names <= snapshot.KEEP + 2, table.concat(names, " ")) -- + known good + "current"
    end)
  end)

  describe("prune", function()
    it("keeps the newest KEEP snapshots and always the known-good one", function()
      local first = assert(snapshot.capture(state_root, "sso.api", files, { run = "r0" }))
      assert(snapshot.promote(state_root, "sso.api", first))
      local made = {}
      for i = 1, 8 do
        made[i] = assert(snapshot.capture(state_root, "sso.api", files, { run = "r" .. i })).name
      end
      local names = {}
      for _, s in ipairs(snapshot.list(state_root, "sso.api")) do names[#names + 1] = s.name end
      assert.same({ first.name, made[4], made[5], made[6], made[7], made[8] }, names)
      assert.equal(first.name, snapshot.known_good(state_root, "sso.api").name)
      -- promoting a newer one lets the old known-good go
      assert(snapshot.promote(state_root, "sso.api", snapshot.list(state_root, "sso.api")[6]))
      names = {}
      for _, s in ipairs(snapshot.list(state_root, "sso.api")) do names[#names + 1] = s.name end
      assert.same({ made[4], made[5], made[6], made[7], made[8] }, names)
      assert.equal(2, snapshot.prune(state_root, "sso.api", 3))
      assert.equal(3, #snapshot.list(state_root, "sso.api"))
    end)
  end)
end)
