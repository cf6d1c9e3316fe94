# sluice — top-level driver around CMake. Outputs go to build/ (plain), build/asan, build/tsan.
#   make            build libsluice (build/libsluice.so, build/libsluice.a)
#   make run        install deps, build, run sluiced in the foreground on 127.0.0.1
#                   (RESP on 6390, HTTP on 8080, in-memory store; Ctrl-C stops it)
#   make test       install deps, build, run every test: plain suite, ASan+UBSan suite, and
#                   the concurrency tests under TSan
#   make test SANITIZE=address|thread   one sanitizer variant (thread: the concurrency tests)
#   make bench      run the benchmarks (bench/RESULTS.md says how to read them)
#   make python     build the Python extension (bindings/python) into the venv
#                   build/python-venv (Debian's python3, offline); `make test` runs its tests
#   make install    header, libraries and sluice.pc under PREFIX (default /usr/local)
#   make fuzz       coverage-guided fuzzing with libFuzzer (clang, ASan+UBSan) of every
#                   tests/fuzz target, FUZZ_SECONDS each (default 60), in build/fuzz; crashes
#                   go to build/fuzz/crashes/ (`make test` runs the same targets briefly)
PREFIX ?= /usr/local
JOBS ?= $(shell nproc)
CMAKE ?= cmake
SANITIZE ?=

ifeq ($(SANITIZE),)
BUILD := build
else
BUILD := build/$(SANITIZE:address=asan)
BUILD := $(BUILD:build/thread=build/tsan)
endif

.PHONY: all deps build run test test-one bench install clean python fuzz

all: build

deps:
	@bash scripts/install-deps.sh

$(BUILD)/CMakeCache.txt:
	@$(CMAKE) -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSL_SANITIZE=$(SANITIZE) \
		-DCMAKE_INSTALL_PREFIX=$(PREFIX) >/dev/null

build: $(BUILD)/CMakeCache.txt
	@$(CMAKE) --build $(BUILD) -j $(JOBS)

RUN_ARGS ?=
run: deps build
	@echo "sluiced on 127.0.0.1 (Ctrl-C stops it). Try, from another terminal:"
	@echo "  redis-cli -p 6390 SL.TAKE acme login alice"
	@echo "  redis-cli -p 6390 CL.THROTTLE user123 15 30 60 1"
	@echo "  curl -s -X POST localhost:8080/api/check_and_consume -d '{\"tenant_id\":\"acme\",\"client_id\":\"alice\",\"action_type\":\"login\"}'"
	@exec ./$(BUILD)/sluiced $(RUN_ARGS)

ifeq ($(SANITIZE),)
test: deps
	@$(MAKE) --no-print-directory test-one
	@$(MAKE) --no-print-directory test-one SANITIZE=address
	@$(MAKE) --no-print-directory test-one SANITIZE=thread
else
test: deps
	@$(MAKE) --no-print-directory test-one SANITIZE=$(SANITIZE)
endif

# thread: only the tests labelled "concurrency"
test-one: build
	@cd $(BUILD) && ctest --output-on-failure --timeout 600 -j 2 \
		$(if $(filter thread,$(SANITIZE)),-L concurrency,)

bench: deps build
	@bash bench/run.sh $(BUILD)
	@$(BUILD)/snapshot_bench
	@bash bench/server_bench.sh $(BUILD)
	@bash bench/redis_bench.sh $(BUILD)
	@$(MAKE) --no-print-directory python
	@build/python-venv/bin/python bench/python_bench.py

# The Python binding, always against the plain build's libsluice.a (ctest's python_install
# fixture runs the same script, so `make test` builds it too).
python: deps
	@$(MAKE) --no-print-directory build SANITIZE=
	@bash bindings/python/install.sh build

# PREFIX is configured again here: the build/ a plain `make` made was configured with the
# default, and sluice.pc has the prefix written into it at configure time.
install: build
	@$(CMAKE) -S . -B $(BUILD) -DCMAKE_INSTALL_PREFIX=$(PREFIX) >/dev/null
	@$(CMAKE) --build $(BUILD) -j $(JOBS)
	@$(CMAKE) --install $(BUILD)

# Each target runs on build/fuzz/corpus/<target>, a copy of tests/fuzz/corpus/<target> that
# keeps what libFuzzer adds between runs; a crash stops that target, the others still run.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := resp resp_cmd snapshot redis_reply http http_api config
fuzz: deps
	@$(CMAKE) -S . -B build/fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
		-DSL_FUZZ=ON >/dev/null
	@$(CMAKE) --build build/fuzz -j $(JOBS) --target fuzz_targets
	@mkdir -p build/fuzz/crashes
	@failed=; for t in $(FUZZ_TARGETS); do \
		mkdir -p build/fuzz/corpus/$$t && cp tests/fuzz/corpus/$$t/* build/fuzz/corpus/$$t/; \
		dict=; [ -f tests/fuzz/$$t.dict ] && dict=-dict=tests/fuzz/$$t.dict; \
		echo "fuzz_$$t: $(FUZZ_SECONDS) s"; \
		build/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 $$dict \
			-print_final_stats=1 -artifact_prefix=build/fuzz/crashes/$$t- \
			build/fuzz/corpus/$$t 2>build/fuzz/fuzz_$$t.log || failed="$$failed $$t"; \
		grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+[[:space:]]+DONE)' \
			build/fuzz/fuzz_$$t.log | sed 's/^/  /'; \
	done; \
	if [ -n "$$failed" ]; then \
		echo "fuzz: failed:$$failed (see build/fuzz/fuzz_<target>.log, build/fuzz/crashes/)"; \
		exit 1; fi

clean:
	rm -rf build
