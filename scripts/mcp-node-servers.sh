#!/bin/sh
# Installs the Node MCP servers the agent hosts (agent/mcp/node/package.json, versions locked in its
# package-lock.json: the filesystem reference server and Node 22 from the npm registry, for this CPU) into the
# Python environment, where the agent looks for them (agent/mcp/config.py). Without npm it says so and the
# filesystem server is reported unavailable; nothing else depends on it.
#   usage: mcp-node-servers.sh SOURCE_DIR TARGET_DIR
set -eu
source_dir=$1
target_dir=$2
if ! command -v npm >/dev/null 2>&1; then
    echo "mcp-node-servers: npm is not installed; the filesystem MCP server will be unavailable"
    exit 0
fi
mkdir -p "$target_dir"
cp "$source_dir/package.json" "$source_dir/package-lock.json" "$source_dir/.npmrc" "$target_dir/"
npm ci --silent --prefix "$target_dir"
