#!/bin/sh
# The daemon image needs iptables and nsenter at run time; say so plainly when they are missing.
for tool in iptables nsenter; do
    command -v "$tool" >/dev/null 2>&1 || echo "minimesh image: $tool is missing; netns capture will fail" >&2
done
exec minimesh "$@"
