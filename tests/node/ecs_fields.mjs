// Prints the ECS field definitions of the @elastic/ecs package (pinned in
// package.json) as JSON: {"version": "8.11.0", "fields": {"client.ip":
// {"type": "ip", "array": false, "allowed": null}, ...}}. tests/ecs.py reads
// it to check shardproxy's log events against the official definitions.
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { EcsFlat, EcsVersion } = require("@elastic/ecs");

const fields = {};
for (const [name, def] of Object.entries(EcsFlat)) {
    fields[name] = {
        type: def.type,
        array: (def.normalize || []).includes("array"),
        allowed: def.allowed_values
            ? def.allowed_values.map((v) => ({ name: v.name, types: v.expected_event_types || null }))
            : null,
    };
}
process.stdout.write(JSON.stringify({ version: EcsVersion, fields }));
