-- Nothing the engine creates or writes below the state root is reached through a symlink: a
-- snapshots/<svc>, runs/, runs/<run>/, deploys/ or run.journal that is a link to a directory
-- elsewhere is an error naming it, and the directory elsewhere stays empty. The state root
-- itself may be a symlink (an operator keeps /var/lib/rrengine on another disk). Real files in
-- a temporary directory, real rsync.
local fs = require("rr.fs")
local deploy = require("rr.deploy")
local snapshot = require("rr.snapshot")
local state = require("rr.state")
local journal = require("rr.journal")
local helpers = require("spec.support.helpers")

local write = helpers.write

describe("the state root", function()
  local dir, root, outside, unit

  before_each(function()
    dir = assert(fs.mkdtemp("/tmp/rr-state-symlink-spec."))
    -- the root is a symlink to another "disk": allowed
    assert(fs.mkdir_p(dir .. "/disk/rrengine", 448))
    assert(fs.symlink(dir .. "/disk/rrengine", dir .. "/state"))
    root = dir .. "/state"
    outside = dir .. "/outside"
    assert(fs.mkdir_p(outside, 493))
    unit = write(dir .. "/units/app.service", "[Service]\nExecStart=/bin/true\n")
  end)

  after_each(function()
    fs.remove_tree(dir)
  end)

  local function files()
    return { { path = unit, role = "unit" } }
  end

  local function outside_is_empty()
    assert.same({}, assert(fs.list(outside)))
  end

  describe("when it is itself a symlink", function()
    it("is used through the link: snapshots, deploys, pointers and the journal all work", function()
      local snap = assert(snapshot.capture(root, "app", files(), { run = "r1", unit = "app.service" }))
      assert(snapshot.promote(root, "app", snap))
      assert.equal(snap.name, snapshot.known_good(root, "app").name)

      write(dir .. "/work/app.js", "v1\n")
      write(dir .. "/release/app.js", "v2 longer\n")
      local rdir = state.record_dir(root, "r1", "app")
      assert(state.deploy_begin(root, "app", rdir))
      local record = assert(deploy.apply{ source = dir .. "/release", target = dir .. "/work", state_dir = rdir })
      assert.equal(root, record.state_root)
      assert(state.deploy_commit(root, "app", rdir))
      assert.equal(rdir, state.read_pointer(root, "app", "last"))
      assert.is_true(deploy.undo(record))
      assert.equal("v1\n", fs.read(dir .. "/work/app.js"))
      assert(state.deploy_undone(root, "app", rdir))

      local j = assert(journal.create(root, { run = "r1", order = { "app" } }))
      j:update("app", { phase = "deploy" })
      assert.equal("deploy", assert(journal.read(root)).services.app.phase)
      assert(j:close())
      assert.is_false(fs.exists(root .. "/run.journal"))
      -- all of it landed on the other "disk"
      assert.same({ "deploys", "runs", "snapshots" }, fs.list(dir .. "/disk/rrengine"))
    end)
  end)

  describe("rr.snapshot", function()
    it("refuses a snapshots/<svc> that is a symlink, writing nothing through it", function()
      assert(fs.mkdir_p(root .. "/snapshots", 448))
      assert(fs.symlink(outside, root .. "/snapshots/app"))
      local snap, err = snapshot.capture(root, "app", files(), { run = "r1" })
      assert.is_nil(snap)
      assert.matches(root .. "/snapshots/app is a symbolic link: refusing to write through it", err, 1, true)
      outside_is_empty()
    end)

    it("refuses a snapshots/ that is a symlink", function()
      assert(fs.symlink(outside, root .. "/snapshots"))
      local snap, err = snapshot.capture(root, "app", files(), { run = "r1" })
      assert.is_nil(snap)
      assert.matches(root .. "/snapshots is a symbolic link: refusing to write through it", err, 1, true)
      outside_is_empty()
    end)

    it("never writes `current` through a snapshots/<svc> replaced by a link since the capture", function()
      local snap = assert(snapshot.capture(root, "app", files(), { run = "r1" }))
      -- someone moves the service's snapshots elsewhere and links them back
      assert(fs.rename(root .. "/snapshots/app", outside .. "/app"))
      assert(fs.symlink(outside .. "/app", root .. "/snapshots/app"))
      local before = fs.list(outside .. "/app")
      local ok, err = snapshot.promote(root, "app", snap)
      assert.is_nil(ok)
      assert.matches(root .. "/snapshots/app is a symbolic link: refusing to write through it", err, 1, true)
      assert.same(before, fs.list(outside .. "/app"))
      assert.is_false(fs.exists(outside .. "/app/current"))
    end)
  end)

  describe("rr.deploy", function()
    local work, release

    before_each(function()
      work, release = dir .. "/work", dir .. "/release"
      write(work .. "/app.js", "v1\n")
      write(release .. "/app.js", "v2 longer\n")
      write(release .. "/new.js", "new\n")
    end)

    it("refuses a runs/ that is a symlink: nothing deployed, nothing written there", function()
      assert(fs.symlink(outside, root .. "/runs"))
      local record, err = deploy.apply{ source = release, target = work,
        state_dir = state.record_dir(root, "r1", "app") }
      assert.is_nil(record)
      assert.matches(root .. "/runs is a symbolic link: refusing to write through it", err, 1, true)
      outside_is_empty()
      assert.equal("v1\n", fs.read(work .. "/app.js"))
      assert.is_false(fs.exists(work .. "/new.js"))
    end)

    it("refuses a runs/<run>/ that is a symlink, with the state root given explicitly too", function()
      assert(fs.mkdir_p(root .. "/runs", 448))
      assert(fs.symlink(outside, root .. "/runs/r1"))
      local record, err = deploy.apply{ source = release, target = work, state_root = root,
        state_dir = root .. "/runs/r1/app" }
      assert.is_nil(record)
      assert.matches(root .. "/runs/r1 is a symbolic link: refusing to write through it", err, 1, true)
      outside_is_empty()
      assert.equal("v1\n", fs.read(work .. "/app.js"))
    end)

    it("prune never removes records reached through a symlinked runs/", function()
      -- records that live elsewhere, reached through runs/ -> outside
      local rdir = outside .. "/r1/app"
      assert(fs.mkdir_p(rdir, 448))
      write(rdir .. "/deploy.json", require("cjson").encode({ version = 2, source = release, target = work,
        state_dir = rdir, backup_dir = rdir .. "/backup", created_at = "2020-01-01T00:00:00.000Z",
        state = "undone" }) .. "\n")
      assert(fs.symlink(outside, root .. "/runs"))
      local result, err = deploy.prune(root, "app", { keep = 0 })
      assert.is_nil(result)
      assert.matches(root .. "/runs is a symbolic link: refusing to write through it", err, 1, true)
      assert.is_true(fs.exists(rdir .. "/deploy.json"))
      assert.same({ "r1" }, fs.list(outside))
    end)
  end)

  describe("rr.state", function()
    it("refuses a deploys/ that is a symlink for every pointer verb", function()
      assert(fs.symlink(outside, root .. "/deploys"))
      local rdir = state.record_dir(root, "r1", "app")
      local ok, err, code = state.deploy_begin(root, "app", rdir)
      assert.is_nil(ok)
      assert.equal("ELOOP", code)
      assert.matches(root .. "/deploys is a symbolic link: refusing to write through it", err, 1, true)
      ok, err, code = state.write_pointer(root, "app", "last", rdir)
      assert.is_nil(ok)
      assert.equal("ELOOP", code)
      outside_is_empty()
      -- pointers that live elsewhere are neither moved nor removed through the link
      write(outside .. "/app.inflight", rdir .. "\n")
      ok, err, code = state.deploy_commit(root, "app", rdir)
      assert.is_nil(ok)
      assert.equal("ELOOP", code)
      ok, err, code = state.deploy_undone(root, "app", rdir)
      assert.is_nil(ok)
      assert.equal("ELOOP", code)
      assert.matches("deploys is a symbolic link", err, 1, true)
      assert.same({ "app.inflight" }, fs.list(outside))
    end)

    it("refuses a symlinked pointer file", function()
      assert(fs.mkdir_p(root .. "/deploys", 448))
      write(outside .. "/victim", "precious\n")
      assert(fs.symlink(outside .. "/victim", root .. "/deploys/app.last"))
      local ok, err, code = state.write_pointer(root, "app", "last", root .. "/runs/r1/app")
      assert.is_nil(ok)
      assert.equal("ELOOP", code)
      assert.matches("app.last is a symbolic link", err, 1, true)
      assert.equal("precious\n", fs.read(outside .. "/victim"))
    end)
  end)

  describe("rr.journal", function()
    it("refuses a run.journal that is a symlink, and leaves what it points to alone", function()
      assert(fs.mkdir_p(root, 448))
      write(outside .. "/victim", "precious\n")
      assert(fs.symlink(outside .. "/victim", root .. "/run.journal"))
      local j, err, code = journal.create(root, { run = "r1", order = { "app" } })
      assert.is_nil(j)
      assert.equal("ELOOP", code)
      assert.matches(root .. "/run.journal is a symbolic link: refusing to write through it", err, 1, true)
      assert.equal("precious\n", fs.read(outside .. "/victim"))
      assert.same({ "victim" }, fs.list(outside))
      -- no temporary file was left in the root
      assert.same({ "run.journal" }, fs.list(root))
      -- and --abandon does not remove it through the link either: it names it
      local ok, rerr = journal.remove(root)
      assert.is_nil(ok)
      assert.matches("run.journal is a symbolic link", rerr, 1, true)
    end)
  end)
end)
