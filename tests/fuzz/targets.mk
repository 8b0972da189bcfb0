# The fuzz targets' extra sources, one block per target (tests/fuzz/fuzz.mk reads this).
# A target is tests/fuzz/<name>.c plus its seed corpus tests/fuzz/corpus/<name>/; here it
# declares what it links besides its own file:
#   <name>_SRC    shim/*.c (or other) sources compiled into the harness
#   <name>_LIBS   libraries to link (the harness is a plain executable: -lcurl is fine)
#   <name>_FLAGS  extra libFuzzer options for `make fuzz` (a <name>.dict beside the harness
#                 is passed as -dict= automatically)

fuzz_http_request_SRC   = shim/http.c
fuzz_http_request_FLAGS = -max_len=8192

fuzz_rules_SRC          = shim/rules.c shim/rules_addr.c shim/rules_redis.c tools/real_stdio.c
fuzz_rules_LIBS         = -pthread
fuzz_rules_FLAGS        = -max_len=16384

fuzz_cache_policy_SRC   = tests/fuzz/cache_policy_revalidation.c shim/cache.c shim/cache_target.c shim/clock.c \
                          shim/http.c shim/sha256.c
fuzz_cache_policy_LIBS  = -lcurl
fuzz_cache_policy_FLAGS = -max_len=8192

fuzz_redis_value_SRC    = shim/redis_value.c shim/cache.c shim/cache_target.c shim/clock.c shim/http.c shim/sha256.c
fuzz_redis_value_LIBS   = -lcurl
fuzz_redis_value_FLAGS  = -max_len=2048

fuzz_response_head_SRC  = shim/http.c shim/cache.c shim/cache_target.c shim/clock.c shim/sha256.c
fuzz_response_head_LIBS = -lcurl
fuzz_response_head_FLAGS = -max_len=4096

fuzz_tls_hello_SRC      = shim/tls_hello.c
fuzz_tls_hello_FLAGS    = -max_len=4096

fuzz_resp_command_SRC   = shim/resp.c shim/buf.c shim/real.c
fuzz_resp_command_LIBS  = -lhiredis -ldl -pthread
fuzz_resp_command_FLAGS = -max_len=4096

fuzz_resp_reply_SRC     = shim/resp.c shim/buf.c shim/real.c
fuzz_resp_reply_LIBS    = -lhiredis -ldl -pthread
fuzz_resp_reply_FLAGS   = -max_len=4096
