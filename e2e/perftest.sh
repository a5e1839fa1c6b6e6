#!/usr/bin/env bash
# RabbitMQ PerfTest (com.rabbitmq:perf-test, e2e/versions.env) and its run-time dependencies from
# Maven Central, once per machine under $WARREN_CACHE/perftest-<version>/lib; a JRE and Maven from
# Debian when missing. Prints the directory of the jars.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
dir=$cache/perftest-$PERFTEST_VERSION
if [ ! -e "$dir/lib/perf-test-$PERFTEST_VERSION.jar" ]; then
  missing=""
  command -v java > /dev/null || missing="$missing openjdk-17-jre-headless"
  command -v mvn > /dev/null || missing="$missing maven"
  if [ -n "$missing" ]; then
    apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >&2
  fi
  tmp=$(mktemp -d "$cache/perftest.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  mvn -q -B -f "$here/perftest/pom.xml" -Dperftest.version="$PERFTEST_VERSION" \
    -Dmaven.repo.local="$cache/maven-repository" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp/lib" >&2
  rm -rf "$dir" && mkdir -p "$dir" && mv "$tmp/lib" "$dir/lib"
fi
echo "$dir/lib"
