# rrengine — build, test, install. `make help` lists the targets.
CC       ?= cc
PREFIX   ?= /usr/local
DESTDIR  ?=
BINDIR   ?= $(PREFIX)/bin
DATADIR  ?= $(PREFIX)/share/rrengine
VERSION  ?= 0.1.0
PKGS     := lua5.4 libsystemd libcurl readline libcrypto
CFLAGS   ?= -O2 -g
WARNINGS := -Wall -Wextra -Werror -Wshadow -Wmissing-prototypes -Wstrict-prototypes \
            -Wpointer-arith -Wformat=2 -Wundef -Wvla -Wwrite-strings
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS))
PKG_LIBS   = $(shell pkg-config --libs $(PKGS))
ALL_CFLAGS = -std=gnu11 $(WARNINGS) $(CFLAGS) $(PKG_CFLAGS) \
             -DRR_VERSION='"$(VERSION)"' -DRR_DATADIR='"$(DATADIR)"'
SAN_FLAGS  := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

# Debian packages the project needs (build, run, test).
DEB_PACKAGES := gcc make pkg-config lua5.4 liblua5.4-dev libsystemd-dev libcurl4-openssl-dev \
                libreadline-dev libssl-dev lua-cjson lua-busted rsync dbus-user-session systemd curl

SRCS    := $(wildcard engine/*.c)
HDRS    := $(wildcard engine/*.h)
SPEC    ?= spec
V       ?= 0
Q       := $(if $(filter 1,$(V)),,@)

.PHONY: FORCE all deps check check-asan check-valgrind bench demo install uninstall clean help

all: rrengine build/fixture

# The installed engine finds its Lua library under DATADIR: rebuild when PREFIX changes.
build/datadir.stamp: FORCE
	@mkdir -p build
	@echo '$(DATADIR) $(VERSION)' | cmp -s - $@ || echo '$(DATADIR) $(VERSION)' > $@

rrengine: $(SRCS) $(HDRS) Makefile build/datadir.stamp
	@echo "  CC      $@"
	$(Q)$(CC) $(ALL_CFLAGS) -o $@ $(SRCS) $(LDFLAGS) $(PKG_LIBS)

rrengine-asan: $(SRCS) $(HDRS) Makefile build/datadir.stamp
	@echo "  CC      $@ (ASan+UBSan)"
	$(Q)$(CC) $(ALL_CFLAGS) -O1 $(SAN_FLAGS) -o $@ $(SRCS) $(LDFLAGS) $(PKG_LIBS)

build/fixture: spec/support/fixture.c Makefile
	@mkdir -p build
	@echo "  CC      $@"
	$(Q)$(CC) -std=gnu11 $(WARNINGS) $(CFLAGS) -o $@ $< $(shell pkg-config --cflags --libs libsystemd)

# Installs exactly what is missing, quietly when everything is there.
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "  APT     $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Every spec, against a sandboxed real systemd user manager.
check: all
	$(Q)spec/support/run-specs ./rrengine $(SPEC)

check-asan: rrengine-asan build/fixture
	$(Q)ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=99 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  spec/support/run-specs ./rrengine-asan $(SPEC)

check-valgrind: all
	$(Q)RR_VALGRIND=1 spec/support/run-specs ./rrengine $(SPEC)

# The whole job, timed: see bench/README.md. build/benchtime reports a child's rusage in µs.
bench: all build/benchtime
	$(Q)spec/support/sandbox run -- ./rrengine bench/run.lua

build/benchtime: bench/benchtime.c Makefile
	@mkdir -p build
	@echo "  CC      $@"
	$(Q)$(CC) -std=gnu11 $(WARNINGS) $(CFLAGS) -o $@ $<

demo: deps all
	$(Q)./demo/run

install: rrengine
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(DATADIR)/lua/rr $(DESTDIR)$(DATADIR)/plans $(DESTDIR)$(DATADIR)/hooks
	install -m 0755 rrengine $(DESTDIR)$(BINDIR)/rrengine
	install -m 0644 lua/rr/*.lua $(DESTDIR)$(DATADIR)/lua/rr/
	install -m 0644 plans/*.lua $(DESTDIR)$(DATADIR)/plans/
	install -m 0644 hooks/*.lua $(DESTDIR)$(DATADIR)/hooks/
	install -m 0644 services.lua $(DESTDIR)$(DATADIR)/services.example.lua

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/rrengine
	rm -rf $(DESTDIR)$(DATADIR)

clean:
	rm -rf rrengine rrengine-asan build

help:
	@echo "make deps | make | make check | make check-asan | make check-valgrind | make bench | make demo | make install [PREFIX=... DESTDIR=...] | make clean"
