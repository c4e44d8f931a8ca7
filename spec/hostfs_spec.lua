-- rr.hostfs: a host's files behind rr.fs's names. The test hosts share this machine's file
-- system, so every remote answer is checked against rr.fs's own on the same path: the same
-- values, the same failure codes.
--
--   spec/support/run-specs ./rrengine spec/hostfs_spec.lua
local fs = require("rr.fs")
local hostfs = require("rr.hostfs")
local hosts = require("spec.support.hosts")

describe("rr.hostfs", function()
  local hs, h, dir

  lazy_setup(function()
    hs = hosts.start(1)
    h = hostfs.remote(hs[1].name, { ssh_config = hs[1].ssh_config })
    dir = assert(fs.mkdtemp("/tmp/rr-hostfs-"))
  end)

  lazy_teardown(function()
    if dir then fs.remove_tree(dir) end
    if hs then hosts.stop(hs) end
  end)

  it("here() is rr.fs with run and getenv", function()
    local here = hostfs.here()
    assert.equal(fs.stat, here.stat)
    assert.is_false(here.remote)
    assert.equal(os.getenv("HOME"), here.getenv("HOME"))
    assert.equal("hi\n", assert(here.run({ "echo", "hi" }, { capture = true })).stdout)
  end)

  it("writes atomically with a mode, reads back byte for byte, and reports what rr.fs reports", function()
    local data = "a\0b'c\"$d\\e\n" .. string.rep("x", 70000)
    local p = dir .. "/w.bin"
    assert(h.write_atomic(p, data, { mode = "0640" }))
    assert.equal(data, fs.read(p))
    assert.equal(data, h.read(p))
    local st, lst = assert(h.stat(p)), assert(fs.stat(p))
    for _, k in ipairs({ "type", "mode", "size", "uid", "gid", "ino", "dev", "nlink" }) do
      assert.equal(lst[k], st[k], k)
    end
    assert.near(lst.mtime, st.mtime, 1e-6)
    assert.equal(416, st.mode)
    -- a replaced file keeps its mode
    assert(h.write_atomic(p, "new"))
    assert.equal(416, fs.stat(p).mode)
    assert.equal(fs.sha256(p), h.sha256(p))
    -- nothing left beside it
    assert.same({ "w.bin" }, h.list(dir))
    assert.same(fs.list(dir), h.list(dir))
  end)

  it("fails as rr.fs fails: the same codes, the path and the host named", function()
    local missing = dir .. "/nope"
    local _, err, code = h.read(missing)
    assert.equal("ENOENT", code)
    assert.matches("nope", err)
    assert.matches(hs[1].name, err)
    assert.equal(select(3, fs.stat(missing)), select(3, h.stat(missing)))
    assert.is_false(h.exists(missing))
    assert.equal("EISDIR", select(3, h.read(dir)))
    assert.equal("EISDIR", select(3, h.sha256(dir)))
    assert.equal("ENOTDIR", select(3, h.list(dir .. "/w.bin")))
    assert.equal("EINVAL", select(3, h.readlink(dir .. "/w.bin")))
    assert.equal("ENOENT", select(3, h.remove(missing)))
    assert(h.mkdir_p(dir .. "/full/sub", "0700"))
    assert.equal("ENOTEMPTY", select(3, h.remove(dir .. "/full")))
    assert.equal("ENOTDIR", select(3, h.mkdir_p(dir .. "/w.bin/x")))
    assert.equal("ENOENT", select(3, h.write_atomic(dir .. "/no/such/dir", "x")))
  end)

  it("copies, links, renames and removes trees as rr.fs does", function()
    local src = dir .. "/src"
    assert(fs.write_atomic(src, "copy me", { mode = "0600" }))
    assert(h.copy_atomic(src, dir .. "/dst"))
    assert.equal("copy me", fs.read(dir .. "/dst"))
    assert.equal(384, fs.stat(dir .. "/dst").mode)
    assert.equal(fs.stat(src).mtime, fs.stat(dir .. "/dst").mtime)
    assert(h.symlink("src", dir .. "/ln"))
    assert.equal("src", h.readlink(dir .. "/ln"))
    assert.equal("link", h.stat(dir .. "/ln").type)
    assert.equal("file", h.stat(dir .. "/ln", true).type)
    assert.equal("ELOOP", select(3, h.copy_atomic(dir .. "/ln", dir .. "/x")))
    assert.equal("EEXIST", select(3, h.symlink("src", dir .. "/ln")))
    assert.equal(fs.realpath(dir .. "/ln"), h.realpath(dir .. "/ln"))
    assert(h.rename(dir .. "/dst", dir .. "/dst2"))
    assert.is_false(fs.exists(dir .. "/dst"))
    assert(h.remove_tree(dir .. "/full"))
    assert.is_false(fs.exists(dir .. "/full"))
    assert.equal("EPERM", select(3, h.remove_tree("/tmp")))
    local many = assert(h.stat_many({ src, dir .. "/gone", dir .. "/ln" }))
    assert.equal("file", many[src].type)
    assert.is_false(many[dir .. "/gone"])
    assert.equal("link", many[dir .. "/ln"].type)
    local sv, lsv = assert(h.statvfs(dir)), assert(fs.statvfs(dir))
    assert.equal(lsv.size, sv.size)
    assert.equal(lsv.bsize, sv.bsize)
  end)

  it("answers for thousands of paths in one command each: stat_many, sha256_many, readlink_many", function()
    -- more than one command line can carry (a single argument to the remote shell is at most
    -- 128 KiB): the paths travel on stdin
    local many = dir .. "/many"
    assert(fs.mkdir_p(many, 493))
    local paths, odd = {}, { "sp ace", "it's", 'q"uote', "back\\slash", "new\nline", "$HOME", "-dash", " *star" }
    for i = 1, 3000 do
      local p = ("%s/%s-%04d-%s"):format(many, string.rep("n", 40), i, odd[i % #odd + 1])
      assert(fs.write_atomic(p, "file " .. i .. "\n", { sync = false }))
      paths[#paths + 1] = p
    end
    assert(fs.symlink(paths[1], many .. "/link"))
    assert(fs.symlink(many .. "/nowhere", many .. "/dangling"))
    local extra = { many .. "/gone", many, many .. "/link", many .. "/dangling" }
    for _, p in ipairs(extra) do paths[#paths + 1] = p end

    local before = h.calls
    local sts = assert(h.stat_many(paths))
    local sums, codes = h.sha256_many(paths)
    assert.is_table(sums)
    local links = assert(h.readlink_many(paths))
    assert.equal(3, h.calls - before)

    for i = 1, 3000 do
      local p = paths[i]
      local lst = fs.stat(p)
      assert.equal(lst.size, sts[p].size, p)
      assert.equal(lst.ino, sts[p].ino, p)
      assert.equal(fs.sha256(p), sums[p], p)
      assert.is_nil(codes[p])
      assert.is_false(links[p])
    end
    assert.is_false(sts[many .. "/gone"])
    assert.equal("dir", sts[many].type)
    assert.equal("link", sts[many .. "/link"].type)
    assert.equal("link", sts[many .. "/dangling"].type)
    -- the same failure codes as h.sha256, path by path
    assert.is_false(sums[many .. "/gone"])
    assert.equal(select(3, h.sha256(many .. "/gone")), codes[many .. "/gone"])
    assert.equal("ENOENT", codes[many .. "/gone"])
    assert.equal(select(3, h.sha256(many)), codes[many])
    assert.equal("EISDIR", codes[many])
    assert.equal(fs.sha256(paths[1]), sums[many .. "/link"]) -- through the link, as sha256
    assert.equal("ENOENT", codes[many .. "/dangling"])
    assert.equal(paths[1], links[many .. "/link"])
    assert.equal(many .. "/nowhere", links[many .. "/dangling"])
    assert.is_false(links[many .. "/gone"])
    assert.is_false(links[many])
    -- following links: a dangling one is missing, as fs.stat(path, true) says
    local followed = assert(h.stat_many({ many .. "/link", many .. "/dangling" }, true))
    assert.equal("file", followed[many .. "/link"].type)
    assert.is_false(followed[many .. "/dangling"])
    -- the handle of this machine has the same calls
    local here = hostfs.here()
    assert.same(sums, (here.sha256_many(paths)))
    assert.same(links, here.readlink_many(paths))
    assert.equal(sts[paths[7]].ino, here.stat_many(paths)[paths[7]].ino)
    -- an empty list costs nothing; an unreachable host fails the whole call
    before = h.calls
    assert.same({}, h.stat_many({}))
    assert.same({}, (h.sha256_many({})))
    assert.equal(before, h.calls)
    local gone = hostfs.remote("nosuchhost", { ssh_config = hs[1].ssh_config })
    local r, err, code = gone.sha256_many({ paths[1] })
    assert.is_nil(r)
    assert.equal("EHOSTUNREACH", code)
    assert.matches("nosuchhost", err)
    assert.has_error(function() h.sha256_many({ "relative" }) end)
  end)

  it("removes and copies many paths in one command each, with rr.fs's outcome for each", function()
    local b = dir .. "/batch"
    assert(fs.mkdir_p(b .. "/full", 493))
    assert(fs.mkdir_p(b .. "/empty/inner", 493))
    local srcs, pairs_ = {}, {}
    for i = 1, 300 do
      local name = ("%s/src %d it's"):format(b, i)
      assert(fs.write_atomic(name, ("source %d\n"):format(i), { mode = i % 2 == 0 and "0600" or "0644", sync = false }))
      srcs[i] = name
      pairs_[i] = { name, ("%s/dst %d \"q\""):format(b, i) }
    end
    assert(fs.write_atomic(pairs_[2][2], "an older dst\n", { mode = "0640" }))
    assert(fs.write_atomic(b .. "/full/x", "x"))
    assert(fs.symlink(srcs[1], b .. "/link"))
    pairs_[#pairs_ + 1] = { b .. "/missing", b .. "/dst-missing" }
    pairs_[#pairs_ + 1] = { b .. "/link", b .. "/dst-link" }
    pairs_[#pairs_ + 1] = { srcs[1], b .. "/no/such/dir/dst" }

    local before = h.calls
    local copied, cerrs = assert(h.copy_many(pairs_))
    assert.equal(1, h.calls - before)
    for i = 1, 300 do
      local dst = pairs_[i][2]
      assert.is_true(copied[dst], dst)
      assert.equal(fs.read(srcs[i]), fs.read(dst))
      assert.equal(fs.stat(srcs[i]).mode, fs.stat(dst).mode)
      assert.equal(fs.stat(srcs[i]).mtime, fs.stat(dst).mtime)
    end
    -- what copy_atomic says for each failure
    assert.is_false(copied[b .. "/dst-missing"])
    assert.equal(select(3, h.copy_atomic(b .. "/missing", b .. "/dst-missing")), cerrs[b .. "/dst-missing"].code)
    assert.equal("ENOENT", cerrs[b .. "/dst-missing"].code)
    assert.equal("ELOOP", cerrs[b .. "/dst-link"].code)
    assert.equal("ENOENT", cerrs[b .. "/no/such/dir/dst"].code)
    assert.matches(hs[1].name, cerrs[b .. "/no/such/dir/dst"].message)
    assert.is_false(fs.exists(b .. "/dst-missing"))

    -- deepest first: the inner directory, then its parent
    local gone = { b .. "/empty/inner", b .. "/empty", b .. "/full", b .. "/link", b .. "/nothing" }
    for i = 1, 300 do gone[#gone + 1] = pairs_[i][2] end
    before = h.calls
    local removed, rerrs = assert(h.remove_many(gone))
    assert.equal(1, h.calls - before)
    assert.is_true(removed[b .. "/empty/inner"])
    assert.is_true(removed[b .. "/empty"])
    assert.is_false(removed[b .. "/full"])
    assert.equal("ENOTEMPTY", rerrs[b .. "/full"].code)
    assert.equal(select(3, fs.remove(b .. "/full")), rerrs[b .. "/full"].code)
    assert.is_true(removed[b .. "/link"])
    assert.is_true(fs.exists(srcs[1])) -- a link is removed, not what it points to
    assert.equal("ENOENT", rerrs[b .. "/nothing"].code)
    for i = 1, 300 do assert.is_false(fs.exists(pairs_[i][2])) end
    assert.is_true(fs.exists(b .. "/full/x"))

    -- this machine's handle: the same outcomes
    local here = hostfs.here()
    local lc, lerrs = here.copy_many({ { srcs[3], b .. "/here" }, { b .. "/missing", b .. "/here2" } })
    assert.is_true(lc[b .. "/here"])
    assert.equal("ENOENT", lerrs[b .. "/here2"].code)
    local lr, lrerrs = here.remove_many({ b .. "/here", b .. "/full" })
    assert.is_true(lr[b .. "/here"])
    assert.equal("ENOTEMPTY", lrerrs[b .. "/full"].code)
  end)

  it("never writes through a symlink below the state root (under)", function()
    local root = dir .. "/root"
    assert(fs.mkdir_p(root .. "/real", 448))
    assert(fs.symlink(dir, root .. "/runs"))
    local _, err, code = h.mkdir_p(root .. "/runs/r1", 448, { under = root })
    assert.equal("ELOOP", code)
    assert.matches("symbolic link", err)
    assert.equal("ELOOP", select(3, h.write_atomic(root .. "/runs/f", "x", { under = root })))
    assert(fs.write_atomic(dir .. "/cp-src", "copy"))
    local copied, errs = assert(h.copy_many({ { dir .. "/cp-src", root .. "/runs/f" }, { dir .. "/cp-src", root .. "/real/g" } },
      { under = root }))
    assert.is_false(copied[root .. "/runs/f"])
    assert.equal("ELOOP", errs[root .. "/runs/f"].code)
    assert.matches("symbolic link", errs[root .. "/runs/f"].message)
    assert.is_true(copied[root .. "/real/g"])
    assert.has_error(function() h.copy_many({ { dir .. "/cp-src", "/elsewhere/g" } }, { under = root }) end)
    assert.is_false(fs.exists(dir .. "/r1"))
    assert.is_false(fs.exists(dir .. "/f"))
    assert(h.write_atomic(root .. "/real/f", "x", { under = root }))
    assert.has_error(function() h.write_atomic("/elsewhere/f", "x", { under = root }) end)
    assert.has_error(function() h.read("relative/path") end)
  end)

  it("reads the host's own environment, and names an unreachable host", function()
    assert.equal(hs[1].env.XDG_STATE_HOME, h.getenv("XDG_STATE_HOME"))
    assert.equal(hs[1].env.XDG_STATE_HOME .. "/rrengine", hostfs.state_root(h, true))
    assert.equal("/var/lib/rrengine", hostfs.state_root(h, false))
    local gone = hostfs.remote("nosuchhost", { ssh_config = hs[1].ssh_config })
    local _, err, code = gone.stat("/tmp")
    assert.equal("EHOSTUNREACH", code)
    assert.matches("nosuchhost", err)
    assert.truthy(gone.lost)
  end)
end)
