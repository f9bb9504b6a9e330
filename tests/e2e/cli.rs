//! The binary's tools: schema drift and pack validation.

use std::process::Command;

fn mozaiks(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mozaiks"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("MOZAIKS_DEV", "1")
        .output()
        .unwrap()
}

#[test]
fn checked_in_schemas_match_the_code() {
    let out = mozaiks(&["schemas", "--check", "schemas"]);
    assert!(
        out.status.success(),
        "schemas/ drifted from the Rust types; run `cargo run -- schemas`:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shipped_workflow_packs_pass_the_check() {
    let out = mozaiks(&["workflows", "check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("hello") && text.contains("triage_handoff"),
        "{text}"
    );
}

#[test]
fn an_invalid_pack_is_refused_with_its_file_and_path() {
    let dir = std::env::temp_dir().join(format!("mz-badpack-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("broken")).unwrap();
    std::fs::write(
        dir.join("broken/workflow.yaml"),
        "name: broken\nstart_agent: nobody\nagents:\n  - name: a\n",
    )
    .unwrap();
    let out = mozaiks(&["workflows", "check", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success());
    assert!(
        err.contains("broken/workflow.yaml") && err.contains("start_agent"),
        "{err}"
    );
}

#[test]
fn a_folder_without_packs_is_refused_without_an_empty_path_segment() {
    let dir = std::env::temp_dir().join(format!("mz-nopacks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = mozaiks(&["workflows", "check", dir.to_str().unwrap()]);
    let absent = mozaiks(&["workflows", "check", dir.join("absent").to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    for out in [empty, absent] {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(dir.to_str().unwrap()), "{err}");
        assert!(!err.contains(": :"), "{err}");
    }
}

#[test]
fn the_default_archive_folder_is_absolute_and_the_variable_still_wins() {
    let help = |archive: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mozaiks"));
        cmd.args(["projector", "--help"])
            .current_dir(std::env::temp_dir())
            .env("HOME", "/home/ops")
            .env_remove("STATE_DIRECTORY")
            .env_remove("XDG_STATE_HOME")
            .env_remove("MOZAIKS_ARCHIVE_DIR");
        if let Some(dir) = archive {
            cmd.env("MOZAIKS_ARCHIVE_DIR", dir);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let text = help(None);
    assert!(
        text.contains("[default: /home/ops/.local/state/mozaiks/archive]"),
        "{text}"
    );
    let text = help(Some("/srv/archive"));
    assert!(text.contains("MOZAIKS_ARCHIVE_DIR=/srv/archive"), "{text}");
}

#[test]
fn a_user_token_is_minted_for_development() {
    let out = mozaiks(&["token", "--sub", "dev", "--roles", "user,admin"]);
    assert!(out.status.success());
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let auth = mozaiks_auth::Auth::new(mozaiks_auth::Config::hs256(
        "mozaiks-development-secret-not-for-production",
        true,
    ))
    .unwrap();
    let claims = auth.verify_user(&token).unwrap();
    assert_eq!(claims.sub, "dev");
    assert!(claims.is_admin());
}

#[test]
fn a_short_secret_is_refused_outside_development_mode() {
    let out = Command::new(env!("CARGO_BIN_EXE_mozaiks"))
        .args(["gateway", "--listen", "127.0.0.1:1"])
        .env("JWT_SECRET", "short")
        .env("NATS_URL", "nats://127.0.0.1:1")
        .env_remove("MOZAIKS_DEV")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("secret"), "{err}");
}

#[test]
fn auto_and_structured_output_mistakes_are_refused_with_their_path() {
    let dir = std::env::temp_dir().join(format!("mz-badauto-{}", std::process::id()));
    let cases = [
        (
            "name: p\nstart_agent: a\npattern: auto\nagents:\n  - name: a\n",
            "pattern",
        ),
        (
            "name: p\nstart_agent: a\npattern: auto\nagents:\n  - {name: a, offline: {next_speaker: zed}}\n  - {name: b}\n",
            "agents[0].offline.next_speaker",
        ),
        (
            "name: p\nstart_agent: a\nagents:\n  - name: a\n    output_schema: {type: object, properties: {x: {type: string}}}\n",
            "agents[0].output_schema.required",
        ),
    ];
    for (yaml, path) in cases {
        std::fs::create_dir_all(dir.join("p")).unwrap();
        std::fs::write(dir.join("p/workflow.yaml"), yaml).unwrap();
        let out = mozaiks(&["workflows", "check", dir.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{yaml}");
        assert!(
            err.contains("p/workflow.yaml") && err.contains(&format!(": {path}: ")),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
