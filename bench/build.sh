#!/bin/sh
# Build the load generator: bench/loadgen from bench/loadgen.c.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
${CC:-gcc} -O2 -Wall -Wextra -pthread -o "$here/loadgen" "$here/loadgen.c"
echo "built $here/loadgen"
