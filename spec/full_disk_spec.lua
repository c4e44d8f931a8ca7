-- A full disk during a deploy, for real: each scenario runs in a child engine in a mount
-- namespace of its own (unshare --mount --propagation private), which mounts a small tmpfs and
-- runs rr.deploy / rr.fs on it, printing what it saw as one JSON line. The namespace (and the
-- tmpfs) dies with the child; the working dir lives outside it, on the spec's temp dir, so the
-- spec checks its bytes itself afterwards.
local fs = require("rr.fs")
local proc = require("rr.proc")
local cjson = require("cjson")
local helpers = require("spec.support.helpers")

local write, engine = helpers.write, helpers.engine

local MiB = 1024 * 1024

-- What every scenario starts with: mount(dir, size) a tmpfs; fill(dir, leave) writes a file
-- that leaves `leave` bytes free (nil: fills it up); filler(dir, bytes); avail(dir) in bytes
-- (stat -f: an engine without rr.fs.statvfs runs these too); done(t) prints the result line.
local PRELUDE = [[
local fs = require("rr.fs")
local proc = require("rr.proc")
local deploy = require("rr.deploy")
local cjson = require("cjson")
local args = cjson.decode(arg[1])

local function mount(dir, size)
  assert(fs.mkdir_p(dir, 448))
  assert(proc.run({ "mount", "-t", "tmpfs", "-o", "size=" .. size .. ",mode=0700", "tmpfs", dir }, { capture = true }))
end

local function avail(dir)
  local res = assert(proc.run({ "stat", "-f", "-c", "%a %S", dir }, { capture = true }))
  local blocks, bsize = res.stdout:match("(%d+) (%d+)")
  return tonumber(blocks) * tonumber(bsize)
end

local function fill(dir, leave)
  if not leave then
    -- dd stops at ENOSPC (and says so with exit code 1)
    proc.run({ "dd", "if=/dev/zero", "of=" .. dir .. "/filler", "bs=4096" }, { capture = true })
    return
  end
  local f = assert(io.open(dir .. "/filler", "wb"))
  assert(f:write(("f"):rep(avail(dir) - leave)))
  assert(f:close())
end

-- A filler of `bytes` to write later in one go, from a callback that must not wait for anything
-- (the bytes are made now): returns write() -> whether it all fit.
local function filler(dir, bytes)
  local data = ("f"):rep(bytes)
  return function()
    local f = assert(io.open(dir .. "/filler", "wb"))
    local ok = f:write(data)
    f:close()
    return ok ~= nil
  end
end

local function done(t)
  io.write("RESULT ", cjson.encode(t), "\n")
end
]]

describe("a full disk", function()
  local dir

  before_each(function()
    dir = assert(fs.mkdtemp("/tmp/rr-full-disk-spec."))
  end)

  after_each(function()
    fs.remove_tree(dir)
  end)

  -- Runs `body` (after PRELUDE) in a child engine in its own mount namespace; returns the table
  -- it passed to done().
  local function scenario(body, args)
    local script = write(dir .. "/scenario.lua", PRELUDE .. body)
    local res, err, _, r = proc.run({ "unshare", "--mount", "--propagation", "private", engine, script,
      cjson.encode(args) }, { capture = true, timeout = 120 })
    local out = res or r
    assert(type(out) == "table", ("the scenario did not run: %s"):format(tostring(err)))
    local line = out.stdout:match("RESULT ([^\n]*)")
    assert(line, ("the scenario printed no result (%s): %s %s"):format(tostring(err), out.stdout, out.stderr))
    return cjson.decode(line)
  end

  -- A working dir whose app holds a 1 MiB file, and a release that replaces it.
  local function one_mib_app(work, release, new_size)
    write(work .. "/big.bin", ("o"):rep(MiB))
    write(work .. "/app.js", "v1\n")
    write(release .. "/big.bin", ("n"):rep(new_size or MiB))
    write(release .. "/app.js", "v2 longer\n")
    write(release .. "/new.js", "new\n")
    return assert(fs.sha256(work .. "/big.bin"))
  end

  local function tree_sums(root)
    local out = {}
    for _, name in ipairs(assert(fs.list(root))) do
      out[name] = fs.stat(root .. "/" .. name).type == "file" and assert(fs.sha256(root .. "/" .. name)) or "dir"
    end
    return out
  end

  describe("before a deploy", function()
    it("refuses it when the backups do not fit on the state dir's file system, touching nothing", function()
      local work, release = dir .. "/work", dir .. "/release"
      one_mib_app(work, release)
      local before = tree_sums(work)
      local r = scenario([[
        mount(args.state, "512k")
        local state_dir = args.state .. "/runs/r1/app"
        local record, err = deploy.apply{ source = args.release, target = args.work, state_dir = state_dir,
          checksum = true }
        done({ ok = record ~= nil, err = err, state = fs.list(args.state), avail = avail(args.state) })
      ]], { state = dir .. "/state", work = work, release = release })
      assert.is_false(r.ok)
      local pattern = ("^not enough free space for the deploy on the file system of %s/state/runs/r1/app "
        .. "%%(tmpfs on %s/state%%): the backups of the files it replaces or deletes need (%%d+) bytes "
        .. "%%([%%d.]+ MiB, with a margin of [%%d.]+ MiB%%), (%%d+) bytes %%([%%d.]+ KiB%%) are available; "
        .. "nothing was changed$"):format(dir:gsub("%p", "%%%0"), dir:gsub("%p", "%%%0"))
      local needed, available = r.err:match(pattern)
      assert(needed, r.err)
      -- the 1 MiB backup and the 1 MiB margin
      assert.is_true(tonumber(needed) > 2 * MiB, needed)
      assert.equal(r.avail, tonumber(available))
      -- nothing was written on the state dir's file system, nothing changed in the working dir
      assert.same({}, r.state)
      assert.same(before, tree_sums(work))
    end)

    it("refuses it when the release does not fit on the working dir's file system", function()
      local release = dir .. "/release"
      write(release .. "/model.bin", ("m"):rep(3 * MiB))
      local r = scenario([[
        mount(args.work, "2m")
        assert(fs.write_atomic(args.work .. "/app.js", "v1\n"))
        local record, err = deploy.apply{ source = args.release, target = args.work,
          state_dir = args.state .. "/runs/r1/app" }
        done({ ok = record ~= nil, err = err, work = fs.list(args.work), state = fs.exists(args.state .. "/runs") })
      ]], { state = dir .. "/state", work = dir .. "/work", release = release })
      assert.is_false(r.ok)
      assert.matches(("not enough free space for the deploy on the file system of %s/work (tmpfs on %s/work): "
        .. "the release (new and replacing files) need "):format(dir, dir), r.err, 1, true)
      assert.matches("; nothing was changed$", r.err)
      assert.same({ "app.js" }, r.work)
      assert.is_false(r.state)
    end)
  end)

  describe("during a deploy", function()
    it("never copies a truncated backup over the working dir, and says exactly what happened", function()
      local work, release = dir .. "/work", dir .. "/release"
      -- a bigger replacement keeps rsync busy on the working dir's disk before its first backup
      local original = one_mib_app(work, release, 16 * MiB)
      local r = scenario([[
        mount(args.state, "4m")
        local state_dir = args.state .. "/runs/r1/app"
        local race_lost, filled
        -- Another writer fills the state dir's file system once rsync has started (past the
        -- free-space check): 56 KiB stay free (the record, written before rsync, takes one page),
        -- so rsync's backup of the 1 MiB file is cut off there and rsync fails (exit 11) without
        -- replacing the original. The filler is made beforehand: the callback only writes it.
        local fill_now = filler(args.state, avail(args.state) - 4096 - 56 * 1024)
        local record, err, partial = deploy.apply{ source = args.release, target = args.work,
          state_dir = state_dir, checksum = true,
          on_spawn = function()
            filled = fill_now()
            race_lost = fs.exists(state_dir .. "/backup/big.bin") -- rsync backed up before the fill
          end }
        local backup = fs.stat(state_dir .. "/backup/big.bin")
        local result = { ok = record ~= nil, err = err, race_lost = race_lost, filled = filled,
          state = partial and partial.state,
          report = partial and partial.undo_report, backup_size = backup and backup.size,
          work_sha = fs.sha256(args.work .. "/big.bin") }
        -- The same record once the original is gone (rsync had replaced it, the service rewrote
        -- it): the truncated backup still must not be copied over it, and undo must fail.
        if partial then
          assert(fs.write_atomic(args.work .. "/big.bin", "rewritten by the service\n"))
          result.undo_ok, result.undo_err = deploy.undo(partial, { force = true })
          result.undo_report = partial.undo_report
          result.after_undo = fs.read(args.work .. "/big.bin")
        end
        done(result)
      ]], { state = dir .. "/state", work = work, release = release })
      assert.is_true(r.filled, "the filler did not fit")
      assert.is_false(r.race_lost, "the filler ran after rsync's first backup: the scenario proves nothing")
      assert.is_false(r.ok)
      -- the 1 MiB original is byte-identical (hashed inside the namespace before the second undo)
      assert.equal(original, r.work_sha)
      local backup_size = math.tointeger(r.backup_size)
      assert.is_true(backup_size < MiB, "rsync left a truncated backup")
      -- the message: rsync's failure, the undo, the backup it did not use and why
      assert.matches("^rsync failed: rsync exited with code 11: ", r.err)
      assert.matches("No space left on device", r.err, 1, true)
      assert.matches("the partial deploy was undone and every file it touched checked against its pre-deploy "
        .. "size and sha256: the working dir is as it was; the backup of big.bin is " .. backup_size
        .. " of 1048576 bytes and was not used (the working dir still holds the original)", r.err, 1, true)
      assert.equal("undone", r.state)
      assert.same({ "big.bin" }, r.report.intact)
      assert.same({}, r.report.not_restorable)
      -- a working copy that is not the original any more: not restorable, said so, not touched
      assert.is_nil(r.undo_ok)
      assert.matches(("%s/big.bin cannot be restored: it is 25 of 1048576 bytes, and its backup "
        .. "%s/state/runs/r1/app/backup/big.bin is %d of 1048576 bytes; it was not touched"):format(work, dir,
        backup_size), r.undo_err, 1, true)
      assert.same({ { path = "big.bin", reason = "25 of 1048576 bytes" } }, r.undo_report.not_restorable)
      assert.equal("rewritten by the service\n", r.after_undo)
      assert.equal("rewritten by the service\n", fs.read(work .. "/big.bin"))
      assert.equal("v1\n", fs.read(work .. "/app.js"))
      assert.is_false(fs.exists(work .. "/new.js"))
    end)
  end)

  describe("the run lock", function()
    it("says No space left on device, never that another run holds it", function()
      local r = scenario([[
        mount(args.state, "64k")
        fill(args.state)
        local lock, err, code = fs.lock(args.state .. "/run.lock")
        local result = { locked = lock ~= nil, err = err, code = code, avail = avail(args.state) }
        -- what a manual rollback (plans/rollback.lua, the REPL) says then
        local exit, msg, rcode = require("rr.rollback").run{ svc = { name = "app", unit = "app.service" },
          user = true, state_root = args.state,
          spell = { no_code = "--no-code", deploy_record = "--deploy-record DIR", named = "--deploy-record" } }
        result.rollback = { exit = exit, msg = msg, code = rcode }
        done(result)
      ]], { state = dir .. "/state" })
      assert.equal(0, r.avail)
      assert.is_false(r.locked)
      assert.equal("ENOSPC", r.code)
      assert.equal(1, r.rollback.exit)
      assert.not_matches("another", r.rollback.msg)
      assert.equal(("cannot take the run lock (%s/state/run.lock): %s"):format(dir, r.err), r.rollback.msg)
      assert.equal("ESTATE", r.rollback.code)
      assert.equal(("cannot write our PID into the lock file %s/state/run.lock: No space left on device"):format(dir),
        r.err)
    end)
  end)
end)
