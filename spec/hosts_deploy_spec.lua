-- A deploy to a remote host, and its undo, make a fixed number of commands there, however many
-- files the release has: each remote command costs tens of milliseconds, and a release has
-- thousands of files. rr.deploy reads the host's files in batches (rr.hostfs's stat_many,
-- sha256_many, readlink_many) and its undo removes and copies back in batches (remove_many,
-- copy_many); the handle counts its commands (h.calls). A structural check, not a timed one.
--
--   spec/support/run-specs ./rrengine spec/hosts_deploy_spec.lua
local fs = require("rr.fs")
local proc = require("rr.proc")
local hostfs = require("rr.hostfs")
local deploy = require("rr.deploy")
local hosts = require("spec.support.hosts")

describe("a deploy on a remote host", function()
  local hs, h, dir

  lazy_setup(function()
    hs = hosts.start(1)
    h = hostfs.remote(hs[1].name, { ssh_config = hs[1].ssh_config })
    dir = assert(fs.mkdtemp("/tmp/rr-hosts-deploy-"))
  end)

  lazy_teardown(function()
    if dir then fs.remove_tree(dir) end
    if hs then hosts.stop(hs) end
  end)

  -- A release of n small files in a few directories, with a symlink; tag makes its bytes.
  local function release(path, n, tag)
    for i = 1, n do
      local sub = ("%s/d%d"):format(path, i % 5)
      assert(fs.mkdir_p(sub, 493))
      assert(fs.write_atomic(("%s/f%d.txt"):format(sub, i), ("%s %d\n"):format(tag, i), { sync = false }))
    end
    assert(fs.symlink("d0/f5.txt", path .. "/current"))
    return path
  end

  -- sha256 of every file and the target of every link below d, as one text
  local function tree(d)
    local res = assert(proc.run({ "sh", "-c", 'cd "$1" && find . \\( -type f -o -type l \\) -printf "%p %l\\n" | sort '
      .. '&& find . -type f -print0 | sort -z | xargs -0 -r sha256sum', "tree", d }, { capture = true }))
    return res.stdout
  end

  -- Deploys v1 then v2 of n files into a fresh working dir on the host, then undoes v2, then
  -- v1: the remote commands of each step, and the working dir before v2 and after its undo.
  local function round(n)
    local base = ("%s/n%d"):format(dir, n)
    local wd, root = base .. "/wd", base .. "/state"
    assert(fs.mkdir_p(wd, 493))
    local d = deploy.on(h)
    local calls = {}
    local function count(what, f)
      local before = h.calls
      local r = f()
      calls[what] = h.calls - before
      return r
    end
    count("apply new", function()
      return assert(d.apply({ source = release(base .. "/v1", n, "v1"), target = wd,
        state_dir = root .. "/runs/r1/svc", state_root = root }))
    end)
    local before = tree(wd)
    local rec = count("apply replacing", function()
      return assert(d.apply({ source = release(base .. "/v2", n, "v2 longer"), target = wd,
        state_dir = root .. "/runs/r2/svc", state_root = root }))
    end)
    assert.equal(n, #rec.replaced) -- every file, the link's target file included
    assert.is_not.equal(before, tree(wd))
    count("undo", function() return assert(d.undo(assert(d.load(root .. "/runs/r2/svc")))) end)
    local after = tree(wd)
    -- then v1's undo: every file and directory it created removed, the working dir empty again
    local first = count("undo new", function()
      local r = assert(d.load(root .. "/runs/r1/svc"))
      assert(d.undo(r))
      return r
    end)
    assert.equal(n + 1 + 5, #first.undo_report.removed) -- the files, the link, the directories
    assert.same({}, fs.list(wd))
    return calls, before, after
  end

  it("makes as many commands for 200 files as for 10, and so does its undo, byte-identical", function()
    local small, before10, after10 = round(10)
    local large, before200, after200 = round(200)
    assert.equal(before10, after10)
    assert.equal(before200, after200)
    -- every file is read in a batch: the count does not grow with the release
    assert.equal(small["apply new"], large["apply new"])
    assert.equal(small["apply replacing"], large["apply replacing"])
    assert.is_true(large["apply replacing"] < 30, tostring(large["apply replacing"]))
    -- and its undo: the checks, the removals and the copies back in batches too
    assert.equal(small.undo, large.undo)
    assert.equal(small["undo new"], large["undo new"])
    assert.is_true(large.undo < 30, tostring(large.undo))
  end)
end)
