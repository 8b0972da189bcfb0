# httpshim build. `make` builds the preload library and the CLI; `make test` runs the
# real-client suite.
CC      ?= cc
PYTHON  ?= /usr/bin/python3
BUILD   ?= build
CFLAGS  ?=
SAN     ?=
# Every C program of the project is compiled with these; the library's objects add what a
# preloaded library needs. -MMD: each object lists the headers it read ($(BUILD)/**/*.d).
WARN_FLAGS = -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O2 -g
C_FLAGS   = $(WARN_FLAGS) -MMD -MP $(SAN) $(CFLAGS)
LIB_FLAGS = $(C_FLAGS) -fPIC -fvisibility=hidden -pthread
# libcurl and hiredis are dlopen'ed when the engine starts (shim/lazylib.c), by
# the sonames of the libraries these headers belong to: an inert process loads none of them.
LIBS    = -ldl -pthread
soname  = $(shell objdump -p "$$($(CC) -print-file-name=lib$(1).so)" 2>/dev/null | awk '/SONAME/ {print $$2}')
LAZYLIB_SONAMES = -DLAZYLIB_CURL='"$(call soname,curl)"' -DLAZYLIB_HIREDIS='"$(call soname,hiredis)"'

SHIM_SRC = $(wildcard shim/*.c)
SHIM_OBJ = $(patsubst shim/%.c,$(BUILD)/obj/%.o,$(SHIM_SRC))

# `make` builds what a user installs: the library and the CLI. What only the tests run (the
# C clients, loop.c on its own, the fuzz-replay binaries) is `test-bins`, built by `make test`.
all: $(BUILD)/libhttpshim.so $(BUILD)/httpshim

TEST_BINS = $(BUILD)/epollclient $(BUILD)/tlsstoreclient $(BUILD)/renegserver $(BUILD)/sockstate $(BUILD)/loop_test $(BUILD)/pool_test $(BUILD)/resp_test \
            $(BUILD)/slowdns.so $(BUILD)/closerace $(BUILD)/forkrace $(BUILD)/sigclient
test-bins: all $(TEST_BINS)

$(BUILD)/obj/%.o: shim/%.c | $(BUILD)/obj
	$(CC) $(LIB_FLAGS) -c $< -o $@

$(BUILD)/obj/lazylib.o: shim/lazylib.c | $(BUILD)/obj
	@case '$(LAZYLIB_SONAMES)' in *'""'*) echo "cannot read the sonames of libcurl/hiredis (objdump, -dev packages)"; exit 1;; esac
	$(CC) $(LIB_FLAGS) $(LAZYLIB_SONAMES) -c $< -o $@

$(BUILD)/libhttpshim.so: $(SHIM_OBJ) shim/exports.map
	$(CC) -shared $(SAN) -o $@ $(SHIM_OBJ) $(LIBS) -Wl,--no-undefined -Wl,-z,now -Wl,--version-script=shim/exports.map

# The CLI: its own files, and the library's objects for what it shares with it (the rules
# parser, exit records, keys and the Redis value format).
CLI_SRC = $(wildcard tools/*.c)
CLI_OBJ = $(patsubst tools/%.c,$(BUILD)/tools/%.o,$(CLI_SRC)) \
          $(addprefix $(BUILD)/obj/,rules.o rules_addr.o rules_redis.o exited.o redis_value.o cache.o cache_target.o http.o sha256.o clock.o)
$(BUILD)/tools/%.o: tools/%.c | $(BUILD)/obj
	@mkdir -p $(@D)
	$(CC) $(C_FLAGS) -DHTTPSHIM_LIBDIR='"$(LIBDIR)"' -c $< -o $@
$(BUILD)/httpshim: $(CLI_OBJ)
	$(CC) $(SAN) -o $@ $(CLI_OBJ) -lcurl -lhiredis -ljansson -lm -pthread

# The tests' C clients: an OpenSSL client that swaps its context's trust store (the
# interposed store setters); a non-blocking epoll client; sockets made and set up the ways
# legacy programs do, reported with raw syscalls; a TLS server that renegotiates to another
# certificate once it has read a request.
$(BUILD)/tlsstoreclient: tests/clients/tlsstoreclient.c | $(BUILD)/obj
	$(CC) $(C_FLAGS) -o $@ $< -lssl -lcrypto
$(BUILD)/renegserver: tests/clients/renegserver.c | $(BUILD)/obj
	$(CC) $(C_FLAGS) -o $@ $< -lssl -lcrypto
$(BUILD)/epollclient: tests/clients/epollclient.c tests/clients/epollclient_resp.c tests/clients/epollclient.h | $(BUILD)/obj
	$(CC) $(C_FLAGS) -o $@ tests/clients/epollclient.c tests/clients/epollclient_resp.c -lm
$(BUILD)/sockstate: tests/clients/sockstate.c | $(BUILD)/obj
	$(CC) $(C_FLAGS) -o $@ $<
$(BUILD)/closerace: tests/clients/closerace.c | $(BUILD)/obj
	$(CC) $(C_FLAGS) -pthread -o $@ $<
$(BUILD)/forkrace: tests/clients/forkrace.c | $(BUILD)/obj
	$(CC) $(C_FLAGS) -pthread -o $@ $<
$(BUILD)/sigclient: tests/clients/sigclient.c | $(BUILD)/obj
	$(CC) $(C_FLAGS) -o $@ $<
# A preload that makes *.slow.test names take seconds to resolve (tests/test_redis.py).
$(BUILD)/slowdns.so: tests/clients/slowdns.c | $(BUILD)/obj
	$(CC) $(C_FLAGS) -shared -fPIC -o $@ $< -ldl

# loop.c on its own (tests/test_loop.py runs it): only the objects it stands on.
LOOP_TEST_OBJ = $(addprefix $(BUILD)/obj/,loop.o fdtable.o fdgate.o real.o log.o clock.o stats.o)
$(BUILD)/loop_test: tests/unit/loop_test.c $(LOOP_TEST_OBJ)
	$(CC) $(C_FLAGS) -pthread -o $@ $< $(LOOP_TEST_OBJ) -ldl

# pool.c's probe slot on its own (tests/test_loop.py runs it too).
POOL_TEST_OBJ = $(addprefix $(BUILD)/obj/,pool.o loop.o fdtable.o fdgate.o real.o log.o clock.o stats.o)
$(BUILD)/pool_test: tests/unit/pool_test.c $(POOL_TEST_OBJ)
	$(CC) $(C_FLAGS) -pthread -o $@ $< $(POOL_TEST_OBJ) -ldl

# resp.c's bounds on their edges and redis_slot.c (tests/test_loop.py runs it too): hiredis linked directly.
RESP_TEST_OBJ = $(addprefix $(BUILD)/obj/,resp.o buf.o real.o redis_slot.o)
$(BUILD)/resp_test: tests/unit/resp_test.c $(RESP_TEST_OBJ)
	$(CC) $(C_FLAGS) -o $@ $< $(RESP_TEST_OBJ) -lhiredis -ldl

-include $(wildcard $(BUILD)/obj/*.d $(BUILD)/tools/*.d $(BUILD)/*.d)

# Made before anything compiles: a machine without the build's packages stops here with
# one line naming them (tools/check-build-deps), not in the middle of a compile.
$(BUILD)/obj:
	@CC='$(CC)' tools/check-build-deps
	mkdir -p $@

# What the tests and the demo need besides the build's packages, installed when missing;
# checked again only when tools/install-deps changes (or `make deps`).
DEPS_STAMP = $(BUILD)/.deps-installed
$(DEPS_STAMP): tools/install-deps
	@tools/install-deps
	@mkdir -p $(@D) && touch $@
deps:
	@tools/install-deps

demo: $(DEPS_STAMP)
	$(MAKE) all
	tools/demo

# The suite runs in parallel (pytest-xdist): most tests wait on clients, upstreams and
# timers, not on the CPU, and each has its own ports, temp dirs and sockets.
TEST_JOBS ?= 6
PYTEST    = HTTPSHIM_TEST_BUILT=1 $(PYTHON) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS)
test: $(DEPS_STAMP)
	$(MAKE) test-bins
	$(PYTEST) tests

.PHONY: all test-bins deps test clean demo install bench bench-quick bench-bins

bench: bench-bins
	@tools/install-deps --bench
	$(MAKE) test-bins
	bench/full

# C programs of the benchmark (bench/full builds them too): a userspace delay line (TUN
# pair) standing in for netem, the fan-in load client, the cost of a write(), and what
# each step of a hit costs.
BENCH_BINS = $(BUILD)/delayline $(BUILD)/fanin $(BUILD)/writecost $(BUILD)/hitcost $(BUILD)/curlcost
bench-bins: $(BENCH_BINS)
$(BUILD)/delayline: bench/delayline.c | $(BUILD)/obj
	$(CC) $(C_FLAGS) -o $@ $<
$(BUILD)/writecost: bench/writecost.c | $(BUILD)/obj
	$(CC) $(C_FLAGS) -o $@ $<
$(BUILD)/hitcost: bench/hitcost.c | $(BUILD)/obj
	$(CC) $(C_FLAGS) -o $@ $<
$(BUILD)/fanin: bench/fanin.c | $(BUILD)/obj
	$(CC) $(C_FLAGS) -pthread -o $@ $< -lm
$(BUILD)/curlcost: bench/curlcost.c | $(BUILD)/obj
	$(CC) $(C_FLAGS) -o $@ $< -lcurl

bench-quick: $(DEPS_STAMP)
	$(MAKE) test-bins
	bench/quick

PREFIX  ?= /usr/local
LIBDIR   = $(PREFIX)/lib/httpshim

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
	  echo "lint: WARNING: the layer check did not run: $(LAYERS) not found (put ../shared beside the checkout, or make lint LAYERS=PATH)" >&2; fi
	cppcheck --quiet --enable=warning,style,performance,portability --std=c11 -D_GNU_SOURCE \
	  --error-exitcode=1 --inline-suppr --suppress=missingIncludeSystem shim/ tools/ tests/clients/ tests/unit/ tests/fuzz/ bench/

# The same suite with the library (and the C client) built with ASan + UBSan. The ASan
# runtime must be the first preloaded object, so tests put it ahead of the library.
ASAN_BUILD = build-asan
test-asan:
	$(MAKE) BUILD=$(ASAN_BUILD) SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" test-bins
	rm -f $(ASAN_BUILD)/asan.* $(ASAN_BUILD)/ubsan.*
	HTTPSHIM_TEST_BUILD=$(ASAN_BUILD) HTTPSHIM_TEST_SKIP_CLIENTS="curl wget wget2 strace redis-cli java" \
	HTTPSHIM_TEST_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=66:log_path=$(CURDIR)/$(ASAN_BUILD)/asan \
	LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp:print_suppressions=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:exitcode=67:log_path=$(CURDIR)/$(ASAN_BUILD)/ubsan \
	  $(PYTEST) tests
	@if ls $(ASAN_BUILD)/asan.* $(ASAN_BUILD)/ubsan.* >/dev/null 2>&1; then \
	  echo "sanitizer reports:"; cat $(ASAN_BUILD)/asan.* $(ASAN_BUILD)/ubsan.* 2>/dev/null; exit 1; fi

.PHONY: lint test-asan
