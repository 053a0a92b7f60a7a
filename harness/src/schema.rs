//! JSON Schema for the scenario format, generated from the YAML shapes in
//! [`crate::scenario`] (`ScenarioSpec` and everything it contains).
//!
//! The committed copy is `cases/scenario.schema.json`; `harness/tests/schema.rs`
//! fails when it is stale (`OVLCONF_UPDATE_SCHEMA=1 cargo test --test schema`
//! rewrites it). Editors use it through the YAML language server.

use crate::scenario::ScenarioSpec;

/// Where the committed schema lives, relative to the workspace root.
pub const SCHEMA_PATH: &str = "cases/scenario.schema.json";

/// The schema as a JSON value. Draft-07, not schemars' default 2020-12: the
/// YAML language server (VS Code's YAML extension, Helix, Neovim, ...) fully
/// supports only draft-07 and warns on newer meta-schemas.
pub fn scenario_schema_value() -> serde_json::Value {
    let mut schema = schemars::generate::SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<ScenarioSpec>();
    schema.insert("title".into(), "ovlconf scenario".into());
    schema.insert(
        "description".into(),
        "One ovlconf scenario file (cases/<area>/<name>.yaml): a layer stack, \
         steps with expected outcomes and the expected final state. \
         Generated from harness/src/scenario.rs; do not edit by hand."
            .into(),
    );
    schema.to_value()
}

/// The schema as pretty-printed JSON with a trailing newline.
pub fn scenario_schema() -> String {
    let mut s =
        serde_json::to_string_pretty(&scenario_schema_value()).expect("a schema always serializes");
    s.push('\n');
    s
}
