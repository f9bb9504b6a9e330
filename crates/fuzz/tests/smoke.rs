//! The CI smoke run of every fuzz target: its seeds, the seeds with random byte edits, and
//! random bytes, 1024 cases each (`PROPTEST_CASES` changes it). The long runs are
//! libFuzzer's, outside CI: see fuzz/README.md.

use std::path::PathBuf;

use mozaiks_fuzz::{TARGETS, seeds};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// A random edit of a byte string.
#[derive(Clone, Debug)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    /// Copies a slice `(from, len)` to `at`.
    Splice(usize, usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Remove),
        (any::<usize>(), 0usize..32, any::<usize>()).prop_map(|(f, l, a)| Edit::Splice(f, l, a)),
    ]
}

fn apply(mut data: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = data.len();
        match *e {
            Edit::Set(i, b) if n > 0 => data[i % n] = b,
            Edit::Insert(i, b) => data.insert(i % (n + 1), b),
            Edit::Remove(i) if n > 0 => {
                data.remove(i % n);
            }
            Edit::Splice(from, len, at) if n > 0 => {
                let from = from % n;
                let piece = data[from..(from + len).min(n)].to_vec();
                let at = at % (n + 1);
                data.splice(at..at, piece);
            }
            _ => {}
        }
    }
    data
}

fn runner() -> TestRunner {
    // PROPTEST_CASES (read by Config::default) sets the count; 1024 by default (a few seconds
    // for every target in a debug build).
    let cases = match std::env::var("PROPTEST_CASES") {
        Ok(_) => Config::default().cases,
        Err(_) => 1024,
    };
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn every_target_passes_its_seeds() {
    for (name, target) in TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name} has no seeds");
        for s in &seeds {
            target(s);
        }
    }
}

#[test]
fn every_target_survives_edited_seeds() {
    for (name, target) in TARGETS {
        let seeds = seeds(name);
        let strategy = (0..seeds.len(), prop::collection::vec(edit(), 1..8));
        runner()
            .run(&strategy, |(i, edits)| {
                target(&apply(seeds[i].clone(), &edits));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn every_target_survives_random_bytes() {
    for (name, target) in TARGETS {
        runner()
            .run(&prop::collection::vec(any::<u8>(), 0..2048), |data| {
                target(&data);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// The shipped packs are the pack targets' seeds; the libFuzzer seed files match [`seeds`]
/// (`MOZAIKS_WRITE_SEEDS=1` rewrites them).
#[test]
fn seed_corpus() {
    let shipped =
        std::fs::read_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../workflows"))
            .expect("workflows/")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().join("workflow.yaml").is_file())
            })
            .count();
    assert_eq!(
        shipped,
        mozaiks_fuzz::PACK_SEEDS.len(),
        "a workflow was added or removed: update PACK_SEEDS in crates/fuzz/src/packs.rs"
    );
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    let write = std::env::var_os("MOZAIKS_WRITE_SEEDS").is_some();
    for (name, _) in TARGETS {
        let dir = root.join(name);
        let seeds = seeds(name);
        if write {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("seed dir");
            for (i, s) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:02}")), s).expect("seed file");
            }
        }
        let on_disk = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .count();
        assert_eq!(
            on_disk,
            seeds.len(),
            "{name}: seed files differ from seeds()"
        );
    }
}

/// Found by fuzzing (target perf_snapshot): an `MZ_PERF` entry whose `active_runs` holds a
/// non-object panicked the ops endpoints (indexing a number as an object), and counters near
/// `u64::MAX` on two workers overflowed their sum.
#[test]
fn hostile_perf_snapshots_are_tolerated() {
    let odd = br#"{"worker_id":"w1","active_runs":[1,"x",null,[],{"app_id":"acme","prompt_tokens":18446744073709551615,"completion_tokens":1}],"apps":{}}"#;
    let big = br#"{"worker_id":"w2","apps":{"acme":{"runs_started":18446744073709551615,"prompt_tokens":18446744073709551615,"completion_tokens":5,"turns":18446744073709551615}}}"#;
    let parsed = mozaiks_gateway::fuzzing::perf_snapshots(&[odd, big, big]);
    assert_eq!(parsed, 3);
}

/// Found by fuzzing (target output_schema): serde_json's default float parsing is not always
/// correctly rounded, so a model's reply naming a float `enum` value exactly could read back one
/// unit in the last place off and be refused; the workspace enables `float_roundtrip`.
#[test]
fn float_enum_values_survive_a_reply() {
    let value = -4.376361621636161e288_f64;
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"x": {"type": "number", "enum": [value]}},
        "required": ["x"]
    });
    mozaiks_packs::output::check_schema("s", &schema).expect("the schema loads");
    let reply = serde_json::json!({ "x": value }).to_string();
    let parsed = mozaiks_packs::output::parse_reply(&schema, &reply).expect("the reply is valid");
    assert_eq!(parsed["x"].as_f64(), Some(value));
}
