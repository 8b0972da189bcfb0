# tests/fuzz/fuzz.mk — fuzzing, included by the top Makefile (which sets CC, BUILD, SAN).
#
# A target is tests/fuzz/fuzz_<name>.c (defining LLVMFuzzerTestOneInput) that has a seed
# corpus directory tests/fuzz/corpus/fuzz_<name>/; what else it links is declared in
# tests/fuzz/targets.mk. Adding a target = those three things, nothing here.
#
#   make fuzz [FUZZ_SECONDS=60] [FUZZ_TARGETS="fuzz_rules ..."] [-j2]
#       builds each harness with clang -fsanitize=fuzzer,address,undefined into
#       $(BUILD)/fuzz/<target> and runs it for FUZZ_SECONDS on the scratch corpus
#       $(BUILD)/fuzz/corpus/<target>/ plus the committed one (read only); logs in
#       $(BUILD)/fuzz/<target>.log, crashes in $(BUILD)/fuzz/artifacts/<target>/.
#       Needs `tools/install-deps --fuzz`. -j2 runs two targets at once; a target that
#       finds a crash stops the run (-k: the other targets still run their time).
#   make fuzz-merge [FUZZ_TARGETS=...]
#       adds to the committed corpus the scratch inputs that reach new code (libFuzzer
#       -merge=1 on edges only, FUZZ_MERGE_FLAGS: not every new hit count); review them,
#       keep the corpus small, replay with make fuzz-replay, then `git add`.
#   make fuzz-replay [FUZZ_TARGETS=...]
#       builds $(BUILD)/fuzz-replay/<target> (the harness + tests/fuzz/replay_main.c, with
#       $(CC) and $(SAN): no clang) and runs each on its committed corpus.
#       tests/test_fuzz_corpus.py does the same inside `make test` / `make test-asan`.
#   FUZZ_REPLAY_BINS   the replay binaries, for `all`.

_fuzz_default_goal := $(.DEFAULT_GOAL)

FUZZ_DIR      = tests/fuzz
include $(FUZZ_DIR)/targets.mk

FUZZ_ALL      := $(foreach t,$(patsubst $(FUZZ_DIR)/%.c,%,$(wildcard $(FUZZ_DIR)/fuzz_*.c)),\
                   $(if $(wildcard $(FUZZ_DIR)/corpus/$(t)/),$(t)))
FUZZ_TARGETS  ?= $(FUZZ_ALL)
FUZZ_SECONDS  ?= 60
FUZZ_CC       ?= clang
FUZZ_FLAGS    ?=
FUZZ_MERGE_FLAGS ?= -use_counters=0 -use_cmp=0
FUZZ_BUILD     = $(BUILD)/fuzz
FUZZ_CFLAGS    = -std=c11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer -Wall -Wextra \
                 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FUZZ_REPLAY_CFLAGS = $(WARN_FLAGS)
FUZZ_HDR       = $(wildcard shim/*.h) $(wildcard $(FUZZ_DIR)/*.h) $(FUZZ_DIR)/targets.mk
FUZZ_REPLAY_BINS = $(addprefix $(BUILD)/fuzz-replay/,$(FUZZ_ALL))

define FUZZ_TARGET_RULES
$(BUILD)/fuzz-replay/$(1): $(FUZZ_DIR)/$(1).c $(FUZZ_DIR)/replay_main.c $$($(1)_SRC) $$(FUZZ_HDR)
	@mkdir -p $$(@D)
	$$(CC) $$(FUZZ_REPLAY_CFLAGS) $$(SAN) $$(CFLAGS) -o $$@ $(FUZZ_DIR)/$(1).c $(FUZZ_DIR)/replay_main.c \
	  $$($(1)_SRC) $$($(1)_LIBS)

$(FUZZ_BUILD)/$(1): $(FUZZ_DIR)/$(1).c $$($(1)_SRC) $$(FUZZ_HDR)
	@mkdir -p $$(@D)
	$$(FUZZ_CC) $$(FUZZ_CFLAGS) -o $$@ $(FUZZ_DIR)/$(1).c $$($(1)_SRC) $$($(1)_LIBS)

fuzz-run-$(1): $(FUZZ_BUILD)/$(1)
	@$(FUZZ_DIR)/run.sh $(FUZZ_BUILD)/$(1) $$(FUZZ_SECONDS) $(FUZZ_BUILD)/corpus/$(1) $(FUZZ_DIR)/corpus/$(1) \
	  $(FUZZ_BUILD)/artifacts/$(1) $(FUZZ_BUILD)/$(1).log \
	  $$(if $$(wildcard $(FUZZ_DIR)/$(1).dict),-dict=$(FUZZ_DIR)/$(1).dict) $$($(1)_FLAGS) $$(FUZZ_FLAGS)

fuzz-merge-$(1): $(FUZZ_BUILD)/$(1)
	@mkdir -p $(FUZZ_BUILD)/corpus/$(1) $(FUZZ_BUILD)/artifacts/$(1)
	$(FUZZ_BUILD)/$(1) -merge=1 $$(FUZZ_MERGE_FLAGS) -artifact_prefix=$(FUZZ_BUILD)/artifacts/$(1)/ $$($(1)_FLAGS) \
	  $(FUZZ_DIR)/corpus/$(1) $(FUZZ_BUILD)/corpus/$(1)

.PHONY: fuzz-run-$(1) fuzz-merge-$(1)
endef
$(foreach t,$(FUZZ_ALL),$(eval $(call FUZZ_TARGET_RULES,$(t))))

fuzz: $(addprefix fuzz-run-,$(FUZZ_TARGETS))

fuzz-merge: $(addprefix fuzz-merge-,$(FUZZ_TARGETS))

fuzz-replay-bins: $(addprefix $(BUILD)/fuzz-replay/,$(FUZZ_TARGETS))

fuzz-replay: fuzz-replay-bins
	@for t in $(FUZZ_TARGETS); do printf '%s: ' "$$t"; \
	  $(BUILD)/fuzz-replay/$$t $(FUZZ_DIR)/corpus/$$t || exit 1; done

.PHONY: fuzz fuzz-merge fuzz-replay fuzz-replay-bins

# Included before the first target, this file must not become the default goal.
ifeq ($(_fuzz_default_goal),)
.DEFAULT_GOAL :=
endif
