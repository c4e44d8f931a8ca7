-- Specs for rr.fs (engine/fs.c): real files in a fresh temporary directory, removed afterwards.
-- Run with the engine as the interpreter: rrengine /usr/bin/busted spec/fs_spec.lua
local fs = require("rr.fs")
local rr = require("rr")
local helpers = require("spec.support.helpers")

local mode, ENGINE = helpers.mode, helpers.engine
local proc = require("rr.proc")

-- Run Lua code in a second engine process: res (stdout, exit_code) | nil, err, res.
local function engine_run(code, timeout)
  return proc.run({ ENGINE, "-e", code }, { timeout = timeout or 60 })
end

-- Our PID, from /proc/self (a symlink to /proc/<pid>).
local function mypid()
  return tonumber(assert(fs.realpath("/proc/self")):match("(%d+)$"))
end

-- Setting an owner needs root: CI runs the specs as root, so a run that is not root fails
-- these specs (saying why) rather than skipping what they prove.
local function require_root()
  assert(assert(fs.stat("/proc/self", true)).uid == 0,
    "this spec sets file owners (chown): run the specs as root, as CI does")
end

describe("rr.fs", function()
  local dir

  before_each(function()
    dir = assert(fs.mkdtemp("/tmp/rr-fs-spec-"))
  end)

  after_each(function()
    if dir then assert(fs.remove_tree(dir)) end
    dir = nil
  end)

  describe("mkdtemp", function()
    it("creates a fresh mode-0700 directory from the prefix", function()
      local other = assert(fs.mkdtemp(dir .. "/t-"))
      assert.matches("^" .. dir:gsub("%p", "%%%0") .. "/t%-%w%w%w%w%w%w$", other)
      local st = assert(fs.stat(other))
      assert.equal("dir", st.type)
      assert.equal(mode("700"), st.mode)
    end)
  end)

  describe("write_atomic", function()
    it("creates a file with the given mode and content", function()
      local p = dir .. "/unit.service"
      assert.is_true(fs.write_atomic(p, "[Service]\n", { mode = mode("600") }))
      assert.equal("[Service]\n", fs.read(p))
      local st = assert(fs.stat(p))
      assert.equal("file", st.type)
      assert.equal(mode("600"), st.mode)
      assert.equal(10, st.size)
    end)

    it("takes the mode as an octal string too", function()
      local p = dir .. "/f"
      assert(fs.write_atomic(p, "x", { mode = "0640" }))
      assert.equal(mode("640"), fs.stat(p).mode)
    end)

    it("raises on a bad mode (misuse)", function()
      assert.has_error(function() fs.write_atomic(dir .. "/f", "x", { mode = "rw-r--r--" }) end)
      assert.has_error(function() fs.write_atomic(dir .. "/f", "x", { mode = 8 ^ 5 }) end)
      assert.has_error(function() fs.write_atomic(dir .. "/f", {}) end)
    end)

    it("replaces a file: new inode, mode kept, no temporary file left", function()
      local p = dir .. "/env"
      assert(fs.write_atomic(p, "A=1\n", { mode = mode("640") }))
      local before = assert(fs.stat(p))
      assert(fs.write_atomic(p, "A=2\n"))
      local after = assert(fs.stat(p))
      assert.equal("A=2\n", fs.read(p))
      assert.are_not.equal(before.ino, after.ino)
      assert.equal(mode("640"), after.mode) -- a replaced file keeps its mode
      assert.same({ "env" }, fs.list(dir))
    end)

    it("lets a reader that opened the old file read all of the old file", function()
      local p = dir .. "/big"
      local old, new = string.rep("a", 1024 * 1024), string.rep("b", 1024 * 1024)
      assert(fs.write_atomic(p, old))
      local reader = assert(io.open(p, "rb"))
      assert(fs.write_atomic(p, new))
      local seen = reader:read("a")
      reader:close()
      assert.is_true(seen == old, "the open reader saw a mix of old and new bytes")
      assert.is_true(fs.read(p) == new)
      assert.same({ "big" }, fs.list(dir))
    end)

    it("never shows a concurrent reader a partial 1 MiB file", function()
      local p = dir .. "/big"
      local A, B = string.rep("a", 1024 * 1024), string.rep("b", 1024 * 1024)
      assert(fs.write_atomic(p, A))
      -- Another process replaces the file 150 times while this one keeps reading it.
      local writer = rr.spawn(engine_run, string.format([[
        local fs = require("rr.fs")
        local A, B = string.rep("a", 1024 * 1024), string.rep("b", 1024 * 1024)
        for i = 1, 150 do assert(fs.write_atomic(%q, i %% 2 == 1 and B or A)) end
        io.write("done")
      ]], p))
      local reads, olds, news = 0, 0, 0
      while writer:status() ~= "done" and writer:status() ~= "failed" do
        local data = assert(fs.read(p))
        reads = reads + 1
        if data == A then olds = olds + 1
        elseif data == B then news = news + 1
        else error(string.format("read %d bytes that are neither the old nor the new file", #data)) end
        rr.sleep(0)
      end
      local ok, res, err = rr.wait(writer)
      assert.is_true(ok)
      assert(res, err)
      assert.equal("done", res.stdout)
      assert.is_true(reads > 0)
      assert.equal(reads, olds + news)
      assert.same({ "big" }, fs.list(dir)) -- every temporary file is gone
    end)

    it("sets the owner when asked (root only)", function()
      require_root()
      local p = dir .. "/owned"
      assert(fs.write_atomic(p, "x", { uid = 1234, gid = 4321, mode = mode("4750") }))
      local st = fs.stat(p)
      assert.equal(1234, st.uid)
      assert.equal(4321, st.gid)
      assert.equal(mode("4750"), st.mode) -- chown before chmod: the setuid bit survives
      assert(fs.write_atomic(p, "y"))     -- and a replacement keeps owner and mode
      st = fs.stat(p)
      assert.equal(1234, st.uid)
      assert.equal(mode("4750"), st.mode)
    end)

    it("fails with a code when the directory does not exist", function()
      local ok, err, code = fs.write_atomic(dir .. "/missing/f", "x")
      assert.is_nil(ok)
      assert.matches("missing/f", err)
      assert.equal("ENOENT", code)
    end)
  end)

  describe("copy_atomic", function()
    it("copies content, mode and mtime", function()
      local src, dst = dir .. "/a.service", dir .. "/b.service"
      local data = string.rep("0123456789abcdef", 20000) -- several copy chunks
      assert(fs.write_atomic(src, data, { mode = mode("751") }))
      assert.is_true(fs.copy_atomic(src, dst))
      assert.equal(data, fs.read(dst))
      local s, d = fs.stat(src), fs.stat(dst)
      assert.equal(mode("751"), d.mode)
      assert.equal(s.mtime, d.mtime)
      assert.is_true(fs.same(src, dst))
    end)

    it("replaces the destination atomically", function()
      local src, dst = dir .. "/new", dir .. "/cur"
      assert(fs.write_atomic(src, "new", { mode = mode("644") }))
      assert(fs.write_atomic(dst, "old", { mode = mode("600") }))
      local ino = fs.stat(dst).ino
      assert(fs.copy_atomic(src, dst))
      assert.equal("new", fs.read(dst))
      assert.equal(mode("644"), fs.stat(dst).mode) -- src's mode, not the replaced file's
      assert.are_not.equal(ino, fs.stat(dst).ino)
      assert.same({ "cur", "new" }, fs.list(dir))
    end)

    it("takes mode overrides and times = false", function()
      local src, dst = dir .. "/a", dir .. "/b"
      assert(fs.write_atomic(src, "x", { mode = mode("600") }))
      assert(fs.copy_atomic(src, dst, { mode = "0444", times = false }))
      assert.equal(mode("444"), fs.stat(dst).mode)
    end)

    it("keeps the owner (root only)", function()
      require_root()
      local src, dst = dir .. "/a", dir .. "/b"
      assert(fs.write_atomic(src, "x", { uid = 1234, gid = 4321 }))
      assert(fs.copy_atomic(src, dst))
      local st = fs.stat(dst)
      assert.equal(1234, st.uid)
      assert.equal(4321, st.gid)
    end)

    it("refuses a source that is not a regular file", function()
      local ok, err, code = fs.copy_atomic(dir, dir .. "/x")
      assert.is_nil(ok)
      assert.matches("not a regular file", err)
      assert.equal("EISDIR", code)

      assert(fs.write_atomic(dir .. "/target", "t"))
      local link = dir .. "/link"
      assert(fs.symlink(dir .. "/target", link))
      ok, err, code = fs.copy_atomic(link, dir .. "/x")
      assert.is_nil(ok)
      assert.matches("symbolic link", err)
      assert.equal("ELOOP", code)

      ok, err, code = fs.copy_atomic(dir .. "/nope", dir .. "/x")
      assert.is_nil(ok)
      assert.equal("ENOENT", code)
      assert.is_false(fs.exists(dir .. "/x"))
    end)
  end)

  describe("stat", function()
    it("describes a file, a directory and a symlink (lstat unless asked to follow)", function()
      assert(fs.write_atomic(dir .. "/f", "12345", { mode = mode("644") }))
      assert(fs.symlink(dir .. "/f", dir .. "/l"))
      local st = assert(fs.stat(dir .. "/f"))
      assert.equal("file", st.type)
      assert.equal(5, st.size)
      assert.equal("integer", math.type(st.mode))
      assert.equal("number", type(st.mtime))
      assert.is_true(math.abs(st.mtime - os.time()) < 60)
      assert.equal("dir", fs.stat(dir).type)
      assert.equal("link", fs.stat(dir .. "/l").type)
      assert.equal("file", fs.stat(dir .. "/l", true).type)
      assert.equal(st.ino, fs.stat(dir .. "/l", true).ino)
      assert.equal("other", fs.stat("/dev/null").type)
    end)

    it("says ENOENT for a missing path", function()
      local st, err, code = fs.stat(dir .. "/missing")
      assert.is_nil(st)
      assert.matches("missing", err)
      assert.equal("ENOENT", code)
    end)
  end)

  describe("exists, mkdir_p, remove, rename, list, realpath, fsync_dir", function()
    it("exists: true, false, and a dangling symlink exists unless followed", function()
      assert.is_true(fs.exists(dir))
      assert.is_false(fs.exists(dir .. "/nope"))
      assert.is_false(fs.exists(dir .. "/nope/deeper"))
      assert(fs.symlink(dir .. "/nope", dir .. "/dangling"))
      assert.is_true(fs.exists(dir .. "/dangling"))
      assert.is_false(fs.exists(dir .. "/dangling", true))
    end)

    it("mkdir_p creates parents, accepts an existing directory, refuses a file in the way", function()
      local p = dir .. "/a/b//c/"
      assert.is_true(fs.mkdir_p(p, mode("750")))
      assert.equal("dir", fs.stat(dir .. "/a/b/c").type)
      assert.is_true(fs.mkdir_p(p))
      assert(fs.write_atomic(dir .. "/file", "x"))
      local ok, err, code = fs.mkdir_p(dir .. "/file/sub")
      assert.is_nil(ok)
      assert.matches("file/sub", err)
      assert.equal("ENOTDIR", code)
    end)

    it("remove: a file, an empty directory; ENOENT and ENOTEMPTY as codes", function()
      assert(fs.write_atomic(dir .. "/f", "x"))
      assert.is_true(fs.remove(dir .. "/f"))
      assert.is_false(fs.exists(dir .. "/f"))
      assert(fs.mkdir_p(dir .. "/d/e"))
      local ok, _, code = fs.remove(dir .. "/d")
      assert.is_nil(ok)
      assert.equal("ENOTEMPTY", code)
      assert.is_true(fs.remove(dir .. "/d/e"))
      assert.is_true(fs.remove(dir .. "/d"))
      ok, _, code = fs.remove(dir .. "/d")
      assert.is_nil(ok)
      assert.equal("ENOENT", code)
    end)

    it("remove: a symlink, not its target", function()
      assert(fs.write_atomic(dir .. "/t", "x"))
      assert(fs.symlink(dir .. "/t", dir .. "/l"))
      assert(fs.remove(dir .. "/l"))
      assert.equal("x", fs.read(dir .. "/t"))
    end)

    it("rename moves over an existing file", function()
      assert(fs.write_atomic(dir .. "/a", "A"))
      assert(fs.write_atomic(dir .. "/b", "B"))
      assert.is_true(fs.rename(dir .. "/a", dir .. "/b"))
      assert.equal("A", fs.read(dir .. "/b"))
      assert.same({ "b" }, fs.list(dir))
      local ok, _, code = fs.rename(dir .. "/a", dir .. "/c")
      assert.is_nil(ok)
      assert.equal("ENOENT", code)
    end)

    it("list returns names sorted bytewise, without . and ..", function()
      for _, n in ipairs({ "b", "a", "C", ".hidden", "a.service.d" }) do
        assert(fs.write_atomic(dir .. "/" .. n, n))
      end
      assert.same({ ".hidden", "C", "a", "a.service.d", "b" }, fs.list(dir))
      assert.same({}, fs.list(assert(fs.mkdtemp(dir .. "/empty-"))))
      local names, _, code = fs.list(dir .. "/nope")
      assert.is_nil(names)
      assert.equal("ENOENT", code)
    end)

    it("symlink and readlink", function()
      assert.is_true(fs.symlink("../some/where", dir .. "/l"))
      assert.equal("../some/where", fs.readlink(dir .. "/l"))
      local ok, _, code = fs.symlink("x", dir .. "/l")
      assert.is_nil(ok)
      assert.equal("EEXIST", code)
      assert(fs.write_atomic(dir .. "/f", "x"))
      ok, _, code = fs.readlink(dir .. "/f")
      assert.is_nil(ok)
      assert.equal("EINVAL", code)
    end)

    it("realpath resolves symlinks and dots", function()
      assert(fs.mkdir_p(dir .. "/x/y"))
      assert(fs.symlink(dir .. "/x", dir .. "/lx"))
      local real = assert(fs.realpath(dir))
      assert.equal(real .. "/x/y", fs.realpath(dir .. "/lx/./y/../y"))
      local r, _, code = fs.realpath(dir .. "/nope")
      assert.is_nil(r)
      assert.equal("ENOENT", code)
    end)

    it("fsync_dir", function()
      assert.is_true(fs.fsync_dir(dir))
      local ok, _, code = fs.fsync_dir(dir .. "/nope")
      assert.is_nil(ok)
      assert.equal("ENOENT", code)
    end)

    it("read: a missing file is ENOENT, a directory EISDIR; binary content is kept", function()
      local data = "\0\1\2\255" .. string.rep("z", 70000)
      assert(fs.write_atomic(dir .. "/bin", data))
      assert.equal(data, fs.read(dir .. "/bin"))
      assert.equal("", fs.read("/dev/null"))
      local s, _, code = fs.read(dir .. "/nope")
      assert.is_nil(s)
      assert.equal("ENOENT", code)
      s, _, code = fs.read(dir)
      assert.is_nil(s)
      assert.equal("EISDIR", code)
    end)

    it("raises on a path with a NUL byte or of the wrong type (misuse)", function()
      assert.has_error(function() fs.stat(dir .. "/a\0b") end)
      assert.has_error(function() fs.read(nil) end)
      assert.has_error(function() fs.remove({}) end)
    end)
  end)

  describe("remove_tree", function()
    it("removes a tree, but never what a symlink inside points to", function()
      local outside = assert(fs.mkdtemp(dir .. "/outside-"))
      assert(fs.write_atomic(outside .. "/keep", "keep"))
      local tree = dir .. "/tree"
      assert(fs.mkdir_p(tree .. "/a/b/c"))
      assert(fs.write_atomic(tree .. "/a/b/c/f", "x"))
      assert(fs.write_atomic(tree .. "/top", "x"))
      assert(fs.symlink(outside, tree .. "/a/link-to-dir"))
      assert(fs.symlink(outside .. "/keep", tree .. "/link-to-file"))
      assert.is_true(fs.remove_tree(tree))
      assert.is_false(fs.exists(tree))
      assert.equal("keep", fs.read(outside .. "/keep"))
    end)

    it("removes a single file or a symlink (not its target)", function()
      assert(fs.write_atomic(dir .. "/f", "x"))
      assert.is_true(fs.remove_tree(dir .. "/f"))
      assert(fs.mkdir_p(dir .. "/target"))
      assert(fs.write_atomic(dir .. "/target/k", "k"))
      assert(fs.symlink(dir .. "/target", dir .. "/l"))
      assert.is_true(fs.remove_tree(dir .. "/l"))
      assert.equal("k", fs.read(dir .. "/target/k"))
    end)

    it("says ENOENT for a missing path", function()
      local ok, _, code = fs.remove_tree(dir .. "/nope")
      assert.is_nil(ok)
      assert.equal("ENOENT", code)
    end)

    it("refuses / and paths with fewer than 2 components", function()
      for _, p in ipairs({ "/", "//", "/tmp", "/tmp/", "/tmp/..", "/tmp/../etc", "/usr/./", ".", ".." }) do
        local ok, err, code = fs.remove_tree(p)
        assert.is_nil(ok, p)
        assert.matches("refusing", err)
        assert.equal("EPERM", code)
      end
      assert.is_true(fs.exists("/tmp"))
      assert.is_true(fs.exists("/etc/passwd"))
    end)
  end)

  describe("under = root: nothing below the state root is followed through a symlink", function()
    local root, outside

    before_each(function()
      -- the root itself is a symlink (an operator's state dir on another disk): that is fine
      assert(fs.mkdir_p(dir .. "/disk/state", 448))
      assert(fs.symlink(dir .. "/disk/state", dir .. "/state"))
      root = dir .. "/state"
      outside = dir .. "/outside"
      assert(fs.mkdir_p(outside, 493))
      assert(fs.mkdir_p(root .. "/real", 448))
      assert(fs.symlink(outside, root .. "/runs"))
    end)

    local function refused(link, ok, err, code)
      assert.is_nil(ok)
      assert.equal("ELOOP", code)
      assert.equal(link .. " is a symbolic link: refusing to write through it", err)
      assert.same({}, assert(fs.list(outside)))
    end

    it("mkdir_p creates real directories below the root, the root through its link", function()
      assert.is_true(fs.mkdir_p(root .. "/snapshots/svc/000001-r", 448, { under = root }))
      assert.equal("dir", fs.stat(dir .. "/disk/state/snapshots/svc/000001-r").type)
      assert.equal(448, fs.stat(root .. "/snapshots/svc").mode)
      assert.is_true(fs.mkdir_p(root, 448, { under = root }))
      -- a root that does not exist yet is created
      assert.is_true(fs.mkdir_p(dir .. "/new-root/a", 448, { under = dir .. "/new-root" }))
      refused(root .. "/runs", fs.mkdir_p(root .. "/runs/r1/svc", 448, { under = root }))
      refused(root .. "/runs", fs.mkdir_p(root .. "/runs", 448, { under = root }))
    end)

    it("write_atomic and copy_atomic refuse a symlinked directory and a symlinked file", function()
      refused(root .. "/runs", fs.write_atomic(root .. "/runs/deploy.json", "{}", { under = root }))
      refused(root .. "/runs", fs.copy_atomic("/etc/hostname", root .. "/runs/copy", { under = root }))
      -- the last component too: a planted run.journal -> elsewhere
      assert(fs.write_atomic(outside .. "/../victim", "mine\n"))
      assert(fs.symlink(dir .. "/victim", root .. "/run.journal"))
      local ok, err, code = fs.write_atomic(root .. "/run.journal", "{}", { under = root })
      assert.is_nil(ok)
      assert.equal("ELOOP", code)
      assert.matches("run.journal is a symbolic link: refusing to write through it", err)
      assert.equal("mine\n", fs.read(dir .. "/victim"))
      assert.equal("link", fs.stat(root .. "/run.journal").type)
      -- no temporary file was left anywhere
      assert.same({ "real", "run.journal", "runs" }, fs.list(root))
      -- below real directories it writes as without the option
      assert.is_true(fs.write_atomic(root .. "/real/x", "x", { under = root, mode = 384 }))
      assert.is_true(fs.copy_atomic(root .. "/real/x", root .. "/real/y", { under = root }))
      assert.equal("x", fs.read(dir .. "/disk/state/real/y"))
    end)

    it("rename, remove and remove_tree refuse a symlinked component", function()
      assert(fs.write_atomic(outside .. "/svc.inflight", "/x\n"))
      assert(fs.write_atomic(root .. "/real/a", "a"))
      local function untouched()
        assert.same({ "svc.inflight" }, fs.list(outside))
      end
      local ok, err, code = fs.rename(root .. "/runs/svc.inflight", root .. "/real/b", { under = root })
      assert.is_nil(ok); assert.equal("ELOOP", code); assert.matches("/runs is a symbolic link", err)
      untouched()
      ok, err, code = fs.rename(root .. "/real/a", root .. "/runs/svc.last", { under = root })
      assert.is_nil(ok); assert.equal("ELOOP", code); assert.matches("/runs is a symbolic link", err)
      untouched()
      ok, err, code = fs.remove(root .. "/runs/svc.inflight", { under = root })
      assert.is_nil(ok); assert.equal("ELOOP", code); assert.matches("/runs is a symbolic link", err)
      untouched()
      ok, err, code = fs.remove_tree(root .. "/runs/svc.inflight", { under = root })
      assert.is_nil(ok); assert.equal("ELOOP", code); assert.matches("/runs is a symbolic link", err)
      untouched()
      -- the same calls on real directories work
      assert.is_true(fs.rename(root .. "/real/a", root .. "/real/b", { under = root }))
      assert.is_true(fs.remove(root .. "/real/b", { under = root }))
      assert(fs.write_atomic(root .. "/real/sub/x", "x", { under = root }) == nil)
      assert(fs.mkdir_p(root .. "/real/sub", 448, { under = root }))
      assert(fs.write_atomic(root .. "/real/sub/x", "x", { under = root }))
      assert.is_true(fs.remove_tree(root .. "/real/sub", { under = root }))
      assert.is_false(fs.exists(root .. "/real/sub"))
      -- without the option a symlink is followed as before
      assert.is_true(fs.remove(root .. "/runs/svc.inflight"))
      assert.same({}, fs.list(outside))
    end)

    it("raises when the path is not under the root (misuse)", function()
      assert.has_error(function() fs.mkdir_p("/etc/rr-x", 448, { under = root }) end)
      assert.has_error(function() fs.write_atomic(root .. "/../x", "", { under = root }) end)
      assert.has_error(function() fs.write_atomic(root, "", { under = root }) end)
      assert.has_error(function() fs.remove_tree(root, { under = root }) end)
      assert.has_error(function() fs.rename(root .. "/a", "/tmp/b", { under = root }) end)
      assert.has_error(function() fs.remove(root .. "/a", { under = 1 }) end)
      assert.has_error(function() fs.remove(root .. "/a", { under = "" }) end)
    end)
  end)

  describe("statvfs", function()
    it("gives the size and free space of a path's file system, in bytes", function()
      local sv = assert(fs.statvfs(dir))
      for _, k in ipairs({ "size", "free", "avail", "bsize", "files", "ffree" }) do
        assert.equal("integer", math.type(sv[k]), k)
      end
      assert.is_true(sv.size > 0 and sv.bsize > 0)
      assert.is_true(sv.avail <= sv.free and sv.free <= sv.size)
      -- what df(1) reads from the same statvfs(2)
      local df = helpers.run({ "df", "-B1", "--output=size", dir }).stdout:match("(%d+)%s*$")
      assert.equal(sv.size, tonumber(df))
      local none, err, code = fs.statvfs(dir .. "/missing")
      assert.is_nil(none)
      assert.equal("ENOENT", code)
      assert.matches("missing", err)
    end)
  end)

  describe("same", function()
    it("is true for identical bytes and mode, false otherwise", function()
      local a, b = dir .. "/a", dir .. "/b"
      local data = string.rep("x", 300000)
      assert(fs.write_atomic(a, data, { mode = mode("644") }))
      assert(fs.write_atomic(b, data, { mode = mode("644") }))
      assert.is_true(fs.same(a, b))
      assert.is_true(fs.same(a, a))
      assert(fs.write_atomic(b, data:sub(1, -2) .. "y")) -- last byte differs, same size
      assert.is_false(fs.same(a, b))
      assert(fs.write_atomic(b, data, { mode = mode("600") })) -- same bytes, other mode
      assert.is_false(fs.same(a, b))
      assert.is_false(fs.same(a, dir .. "/missing"))
      assert.is_false(fs.same(dir .. "/missing", a))
      assert.is_false(fs.same(dir, dir))
    end)
  end)

  describe("sha256", function()
    it("matches the known digests", function()
      assert(fs.write_atomic(dir .. "/abc", "abc"))
      assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", fs.sha256(dir .. "/abc"))
      assert(fs.write_atomic(dir .. "/empty", ""))
      assert.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", fs.sha256(dir .. "/empty"))
      -- FIPS 180-2's million "a": several read chunks
      assert(fs.write_atomic(dir .. "/million", string.rep("a", 1000000)))
      assert.equal("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0", fs.sha256(dir .. "/million"))
      local h, _, code = fs.sha256(dir .. "/nope")
      assert.is_nil(h)
      assert.equal("ENOENT", code)
    end)
  end)

  describe("lock", function()
    it("getpid is our PID", function()
      assert.equal(mypid(), fs.getpid())
    end)

    it("writes our PID and refuses a second lock in this process, naming us", function()
      local p = dir .. "/run.lock"
      local l = assert(fs.lock(p))
      assert.equal(mypid() .. "\n", fs.read(p))
      assert.is_true(l:held())
      assert.equal(p, l:path())
      -- flock on a second descriptor conflicts even in the same process
      local l2, err, code, pid = fs.lock(p)
      assert.is_nil(l2)
      assert.equal("locked by pid " .. mypid(), err)
      assert.equal("EWOULDBLOCK", code)
      assert.equal(mypid(), pid)
      l:unlock()
      assert.is_false(l:held())
      l:unlock() -- idempotent
      l2 = assert(fs.lock(p))
      l2:unlock()
    end)

    it("is released by <close> and by the collector", function()
      local p = dir .. "/run.lock"
      do
        local l <close> = assert(fs.lock(p))
        assert.is_nil((fs.lock(p)))
      end
      local l = assert(fs.lock(p))
      l = nil -- luacheck: ignore
      collectgarbage()
      collectgarbage()
      local again = assert(fs.lock(p))
      again:unlock()
    end)

    it("refuses a symlink as the lock file", function()
      assert(fs.symlink(dir .. "/elsewhere", dir .. "/run.lock"))
      local l, _, code = fs.lock(dir .. "/run.lock")
      assert.is_nil(l)
      assert.equal("ELOOP", code)
      assert.is_false(fs.exists(dir .. "/elsewhere"))
    end)

    it("keeps the descriptor close-on-exec", function()
      local p = dir .. "/run.lock"
      local l = assert(fs.lock(p))
      local real, found = assert(fs.realpath(p)), false
      for _, fd in ipairs(assert(fs.list("/proc/self/fd"))) do
        if fs.realpath("/proc/self/fd/" .. fd) == real then
          found = true
          local flags = assert(fs.read("/proc/self/fdinfo/" .. fd)):match("flags:%s*(%d+)")
          assert.is_true(tonumber(flags, 8) & tonumber("2000000", 8) ~= 0, "O_CLOEXEC is not set")
        end
      end
      assert.is_true(found)
      l:unlock()
    end)

    it("makes a second lock in another process fail, naming our PID", function()
      local p = dir .. "/run.lock"
      local l = assert(fs.lock(p))
      local code = string.format([[
        local l, err, code, pid = require("rr.fs").lock(%q)
        io.write(tostring(l), "|", tostring(err), "|", tostring(code), "|", tostring(pid))
      ]], p)
      local res = assert(engine_run(code))
      assert.equal(string.format("nil|locked by pid %d|EWOULDBLOCK|%d", mypid(), mypid()), res.stdout)
      l:unlock()
      res = assert(engine_run(string.format([[
        local l = assert(require("rr.fs").lock(%q))
        io.write(require("rr.fs").read(%q))
      ]], p, p)))
      assert.equal(res.pid .. "\n", res.stdout) -- the other process got it and wrote its PID
    end)

    it("is not kept by a child process after we release it", function()
      local p = dir .. "/run.lock"
      local l = assert(fs.lock(p))
      local child = assert(proc.spawn({ "sleep", "30" }))
      l:unlock()
      local again, err = fs.lock(p) -- a child holding the descriptor would keep the flock
      assert(again, err)
      again:unlock()
      child:kill("KILL")
      child:wait()
      child:close()
    end)
  end)
end)
