# httpshim build. `make` builds the preload library; `make test` runs the real-client suite.
CC      ?= cc
PYTHON  ?= /usr/bin/python3
BUILD   ?= build
CFLAGS_BASE = -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O2 -g -fPIC -fvisibility=hidden -pthread
CFLAGS  ?=
SAN     ?=
# libcurl and hiredis are dlopen'ed when the engine starts (shim/lazylib.c), by
# the sonames of the libraries these headers belong to: an inert process loads none of them.
LIBS    = -ldl -pthread
soname  = $(shell objdump -p "$$($(CC) -print-file-name=lib$(1).so)" 2>/dev/null | awk '/SONAME/ {print $$2}')
LAZYLIB_SONAMES = -DLAZYLIB_CURL='"$(call soname,curl)"' -DLAZYLIB_HIREDIS='"$(call soname,hiredis)"'

SHIM_SRC = $(wildcard shim/*.c)
SHIM_HDR = $(wildcard shim/*.h)
SHIM_OBJ = $(patsubst shim/%.c,$(BUILD)/obj/%.o,$(SHIM_SRC))

# `make` builds what a user installs: the library and the CLI. What only the tests run (the
# C clients, loop.c on its own, the fuzz-replay binaries) is `test-bins`, built by `make test`.
all: $(BUILD)/libhttpshim.so $(BUILD)/httpshim

TEST_BINS = $(BUILD)/epollclient $(BUILD)/tlsstoreclient $(BUILD)/sockstate $(BUILD)/loop_test
test-bins: all $(TEST_BINS)

$(BUILD)/obj/%.o: shim/%.c $(SHIM_HDR) | $(BUILD)/obj
	$(CC) $(CFLAGS_BASE) $(SAN) $(CFLAGS) -c $< -o $@

$(BUILD)/obj/lazylib.o: shim/lazylib.c $(SHIM_HDR) | $(BUILD)/obj
	@case '$(LAZYLIB_SONAMES)' in *'""'*) echo "cannot read the sonames of libcurl/hiredis (objdump, -dev packages)"; exit 1;; esac
	$(CC) $(CFLAGS_BASE) $(SAN) $(CFLAGS) $(LAZYLIB_SONAMES) -c $< -o $@

$(BUILD)/libhttpshim.so: $(SHIM_OBJ) shim/exports.map
	$(CC) -shared $(SAN) -o $@ $(SHIM_OBJ) $(LIBS) -Wl,--no-undefined -Wl,-z,now -Wl,--version-script=shim/exports.map

PREFIX  ?= /usr/local
LIBDIR   = $(PREFIX)/lib/httpshim
$(BUILD)/httpshim: tools/httpshim.c shim/rules.c shim/rules.h shim/exited.c shim/exited.h tools/real_stdio.c \
                   shim/redis_value.c shim/redis_value.h shim/cache.c shim/cache.h shim/http.c shim/http.h \
                   shim/sha256.c shim/sha256.h | $(BUILD)/obj
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O2 -g $(SAN) -DHTTPSHIM_LIBDIR='"$(LIBDIR)"' \
	  -o $@ tools/httpshim.c shim/rules.c shim/exited.c tools/real_stdio.c \
	  shim/redis_value.c shim/cache.c shim/http.c shim/sha256.c -lcurl -lhiredis -ljansson -lm -pthread

# an OpenSSL client that swaps its context's trust store (the interposed store setters)
$(BUILD)/tlsstoreclient: tests/clients/tlsstoreclient.c | $(BUILD)/obj
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O2 -g $(SAN) -o $@ $< -lssl -lcrypto

$(BUILD)/epollclient: tests/clients/epollclient.c | $(BUILD)/obj
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O2 -g $(SAN) -o $@ $< -lm

# sockets made and set up the ways legacy programs do, reported with raw syscalls
$(BUILD)/sockstate: tests/clients/sockstate.c | $(BUILD)/obj
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O2 -g $(SAN) -o $@ $<

# loop.c on its own (tests/test_loop.py runs it): only the objects it stands on.
LOOP_TEST_OBJ = $(addprefix $(BUILD)/obj/,loop.o fdtable.o real.o log.o)
$(BUILD)/loop_test: tests/unit/loop_test.c shim/loop.h $(LOOP_TEST_OBJ)
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O2 -g $(SAN) -pthread -o $@ $< $(LOOP_TEST_OBJ) -ldl

# Made before anything compiles: a machine without the build's packages stops here with
# one line naming them (tools/check-build-deps), not in the middle of a compile.
$(BUILD)/obj:
	@CC='$(CC)' tools/check-build-deps
	mkdir -p $@

deps:
	@tools/install-deps

demo: deps
	$(MAKE) all
	tools/demo

# The suite runs in parallel (pytest-xdist): most tests wait on clients, upstreams and
# timers, not on the CPU, and each has its own ports, temp dirs and sockets.
TEST_JOBS ?= 4
PYTEST    = $(PYTHON) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS)
test: deps
	$(MAKE) test-bins
	$(PYTEST) tests

.PHONY: all test-bins deps test clean demo install bench bench-quick bench-bins

bench: deps bench-bins
	$(MAKE) test-bins
	bench/full

# C programs of the benchmark (bench/full builds them too): a userspace delay line (TUN
# pair) standing in for netem, and the fan-in load client.
BENCH_BINS = $(BUILD)/delayline $(BUILD)/fanin $(BUILD)/writecost
bench-bins: $(BENCH_BINS)

$(BUILD)/delayline: bench/delayline.c | $(BUILD)/obj
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O2 -g $(SAN) -o $@ $<

$(BUILD)/writecost: bench/writecost.c | $(BUILD)/obj
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O2 -g $(SAN) -o $@ $<

$(BUILD)/fanin: bench/fanin.c | $(BUILD)/obj
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O2 -g $(SAN) -pthread -o $@ $< -lm

bench-quick: deps
	$(MAKE) test-bins
	bench/quick

DESTDIR ?=
install: all
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1 \
	  $(DESTDIR)$(PREFIX)/share/doc/httpshim
	install -m 0755 $(BUILD)/libhttpshim.so $(DESTDIR)$(LIBDIR)/libhttpshim.so
	install -m 0755 $(BUILD)/httpshim $(DESTDIR)$(PREFIX)/bin/httpshim
	install -m 0644 docs/httpshim.1 $(DESTDIR)$(PREFIX)/share/man/man1/httpshim.1
	install -m 0644 rules.conf $(DESTDIR)$(PREFIX)/share/doc/httpshim/rules.conf.example
clean:
	rm -rf $(BUILD)

# ---- fuzzing: make fuzz / fuzz-replay (tests/fuzz/fuzz.mk); `test-bins` builds the replay binaries ----
include tests/fuzz/fuzz.mk
test-bins: $(FUZZ_REPLAY_BINS)

# ---- checks ----
# cppcheck, and the layer picture of the library's object files: it must have no cycles.
LAYERS ?= ../shared/tools/layers
lint: $(BUILD)/libhttpshim.so
	@if [ -x $(LAYERS) ]; then $(LAYERS) $(BUILD)/obj; else \
	  echo "lint: WARNING: $(LAYERS) not found (../shared beside the checkout): layer check skipped"; fi
	cppcheck --quiet --enable=warning,style,performance,portability --std=c11 -D_GNU_SOURCE \
	  --error-exitcode=1 --inline-suppr --suppress=missingIncludeSystem shim/ tools/ tests/clients/ tests/unit/ tests/fuzz/ bench/

# The same suite with the library (and the C client) built with ASan + UBSan. The ASan
# runtime must be the first preloaded object, so tests put it ahead of the library.
ASAN_BUILD = build-asan
test-asan:
	$(MAKE) BUILD=$(ASAN_BUILD) SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" test-bins
	rm -f $(ASAN_BUILD)/asan.* $(ASAN_BUILD)/ubsan.*
	HTTPSHIM_TEST_BUILD=$(ASAN_BUILD) HTTPSHIM_TEST_SKIP_CLIENTS="curl wget strace" \
	HTTPSHIM_TEST_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=66:log_path=$(CURDIR)/$(ASAN_BUILD)/asan \
	LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp:print_suppressions=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:exitcode=67:log_path=$(CURDIR)/$(ASAN_BUILD)/ubsan \
	  $(PYTEST) tests
	@if ls $(ASAN_BUILD)/asan.* $(ASAN_BUILD)/ubsan.* >/dev/null 2>&1; then \
	  echo "sanitizer reports:"; cat $(ASAN_BUILD)/asan.* $(ASAN_BUILD)/ubsan.* 2>/dev/null; exit 1; fi

.PHONY: lint test-asan
