//! Checking a module against the ABI before it is allowed to run.

use std::sync::Arc;

use membrane_abi::{FactManifest, ABI_VERSION, FACTS_SECTION};
use wasmtime::{ExternType, FuncType, Linker, Module, ValType};

use crate::error::{EvalError, LoadError};
use crate::predicate::Predicate;
use crate::{Engine, Shared};

impl Engine {
    /// Compiles and checks a predicate module that takes no config (compiled criteria), then
    /// runs it once (instantiation and `membrane_abi_version`) under the engine's limits.
    pub fn load(&self, wasm: &[u8]) -> Result<Predicate, LoadError> {
        self.load_with_config(wasm, &serde_json::Value::Object(serde_json::Map::new()))
    }

    /// Like [`Engine::load`], for a module that receives `config` (a plugin bucket's `[config]`
    /// table). When the module exports `membrane_configure`, every instance gets the config as
    /// JSON before its first `membrane_eval`; the trial run does the same, so a config the
    /// module rejects fails here with its explanation. A module without that export may only be
    /// given an empty config.
    pub fn load_with_config(
        &self,
        wasm: &[u8],
        config: &serde_json::Value,
    ) -> Result<Predicate, LoadError> {
        let limits = &self.shared.limits;
        if wasm.len() > limits.max_module_bytes {
            return Err(LoadError::TooLarge {
                bytes: wasm.len(),
                max: limits.max_module_bytes,
            });
        }
        let module = Module::new(&self.shared.wasmtime, wasm)
            .map_err(|error| LoadError::Invalid(format!("{error:#}")))?;
        reject_imports(&module)?;
        check_exports(&self.shared, &module)?;
        let configurable = has_optional_export(&self.shared, &module, OptionalExport::Configure)?;
        has_optional_export(&self.shared, &module, OptionalExport::LastError)?;
        let manifest = read_manifest(wasm)?;
        let config = match (configurable, is_empty_config(config)) {
            (true, _) => Some(config.to_string().into_bytes()),
            (false, true) => None,
            (false, false) => {
                return Err(LoadError::ConfigNotAccepted {
                    export: membrane_abi::EXPORT_CONFIGURE,
                })
            }
        };
        // With no imports there is nothing to link; this cannot fail for a checked module.
        let instance_pre = Linker::new(&self.shared.wasmtime)
            .instantiate_pre(&module)
            .map_err(|error| LoadError::Invalid(format!("{error:#}")))?;
        let predicate = Predicate::new(Arc::clone(&self.shared), manifest, instance_pre, config);
        let version = predicate.trial_run().map_err(|error| match error {
            EvalError::ConfigRejected { code, message } => {
                LoadError::ConfigRejected { code, message }
            }
            other => LoadError::TrialRun(other),
        })?;
        if version != ABI_VERSION as i32 {
            return Err(LoadError::WrongAbiVersion {
                origin: "membrane_abi_version()",
                found: version.into(),
                expected: ABI_VERSION,
            });
        }
        Ok(predicate)
    }
}

fn reject_imports(module: &Module) -> Result<(), LoadError> {
    match module.imports().next() {
        Some(import) => Err(LoadError::Import {
            module: import.module().to_owned(),
            name: import.name().to_owned(),
        }),
        None => Ok(()),
    }
}

/// The ABI's function exports and their signatures.
fn expected_functions(engine: &wasmtime::Engine) -> [(&'static str, FuncType); 3] {
    use ValType::{I32, I64};
    [
        (
            membrane_abi::EXPORT_VERSION,
            FuncType::new(engine, [], [I32]),
        ),
        (
            membrane_abi::EXPORT_ALLOC,
            FuncType::new(engine, [I32], [I32]),
        ),
        (
            membrane_abi::EXPORT_EVAL,
            FuncType::new(engine, [I32, I32, I32, I64], [I32]),
        ),
    ]
}

/// Exports a module may have; when present they must have these signatures.
#[derive(Debug, Clone, Copy)]
enum OptionalExport {
    Configure,
    LastError,
}

impl OptionalExport {
    fn name(self) -> &'static str {
        match self {
            OptionalExport::Configure => membrane_abi::EXPORT_CONFIGURE,
            OptionalExport::LastError => membrane_abi::EXPORT_LAST_ERROR,
        }
    }

    fn signature(self, engine: &wasmtime::Engine) -> FuncType {
        use ValType::{I32, I64};
        match self {
            OptionalExport::Configure => FuncType::new(engine, [I32, I32], [I32]),
            OptionalExport::LastError => FuncType::new(engine, [], [I64]),
        }
    }
}

/// Whether the module exports `export`, refusing it when it has the wrong signature.
fn has_optional_export(
    shared: &Shared,
    module: &Module,
    export: OptionalExport,
) -> Result<bool, LoadError> {
    let name = export.name();
    let expected = export.signature(&shared.wasmtime);
    match module.get_export(name) {
        None => Ok(false),
        Some(ExternType::Func(found)) if FuncType::eq(&found, &expected) => Ok(true),
        Some(other) => Err(LoadError::WrongExport {
            name,
            expected: format!("a function {expected}"),
            found: describe(&other),
        }),
    }
}

/// `{}` (what a bucket without a `[config]` table gets) or `null`.
fn is_empty_config(config: &serde_json::Value) -> bool {
    match config {
        serde_json::Value::Null => true,
        serde_json::Value::Object(map) => map.is_empty(),
        _ => false,
    }
}

const EXPECTED_MEMORY: &str = "a 32-bit, unshared linear memory";

fn check_exports(shared: &Shared, module: &Module) -> Result<(), LoadError> {
    match module.get_export(membrane_abi::EXPORT_MEMORY) {
        None => {
            return Err(LoadError::MissingExport {
                name: membrane_abi::EXPORT_MEMORY,
                expected: EXPECTED_MEMORY.into(),
            })
        }
        Some(ExternType::Memory(memory)) if !memory.is_64() && !memory.is_shared() => {}
        Some(other) => {
            return Err(LoadError::WrongExport {
                name: membrane_abi::EXPORT_MEMORY,
                expected: EXPECTED_MEMORY.into(),
                found: describe(&other),
            })
        }
    }
    for (name, expected) in expected_functions(&shared.wasmtime) {
        match module.get_export(name) {
            None => {
                return Err(LoadError::MissingExport {
                    name,
                    expected: format!("a function {expected}"),
                })
            }
            Some(ExternType::Func(found)) if FuncType::eq(&found, &expected) => {}
            Some(other) => {
                return Err(LoadError::WrongExport {
                    name,
                    expected: format!("a function {expected}"),
                    found: describe(&other),
                })
            }
        }
    }
    Ok(())
}

fn describe(extern_type: &ExternType) -> String {
    match extern_type {
        ExternType::Func(func) => format!("a function {func}"),
        ExternType::Memory(memory) => format!(
            "a {}{} memory",
            if memory.is_shared() { "shared " } else { "" },
            if memory.is_64() { "64-bit" } else { "32-bit" }
        ),
        ExternType::Global(_) => "a global".into(),
        ExternType::Table(_) => "a table".into(),
        ExternType::Tag(_) => "a tag".into(),
    }
}

/// Finds and parses the one `membrane.facts` custom section.
fn read_manifest(wasm: &[u8]) -> Result<FactManifest, LoadError> {
    let mut section_data = None;
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|error| LoadError::Invalid(error.to_string()))?;
        if let wasmparser::Payload::CustomSection(section) = payload {
            if section.name() == FACTS_SECTION {
                if section_data.is_some() {
                    return Err(LoadError::DuplicateFactsSection {
                        section: FACTS_SECTION,
                    });
                }
                section_data = Some(section.data());
            }
        }
    }
    let data = section_data.ok_or(LoadError::MissingFactsSection {
        section: FACTS_SECTION,
    })?;
    let manifest =
        FactManifest::from_json(data).map_err(|error| LoadError::InvalidFactsSection {
            section: FACTS_SECTION,
            reason: error.to_string(),
        })?;
    if manifest.abi != ABI_VERSION {
        return Err(LoadError::WrongAbiVersion {
            origin: "the fact manifest",
            found: manifest.abi.into(),
            expected: ABI_VERSION,
        });
    }
    Ok(manifest)
}
