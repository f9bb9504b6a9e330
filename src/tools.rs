//! The sub-commands that are not roles: `token`, `workflows check`, `plugins check`, `schemas`.

use std::process::ExitCode;

use mozaiks_packs::Catalog;

use crate::config::{Global, PluginsCmd, SchemasArgs, TokenArgs, WorkflowsCmd};

pub fn token(g: &Global, args: TokenArgs) -> anyhow::Result<ExitCode> {
    let auth = mozaiks_auth::Auth::new(mozaiks_auth::Config::hs256(
        args.auth.jwt_secret()?,
        args.auth.dev,
    ))?;
    let app = args.app.unwrap_or_else(|| g.default_app_id.clone());
    let roles: Vec<&str> = args
        .roles
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .collect();
    let token = auth.mint_user(&args.sub, &app, &roles, args.ttl)?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

pub fn workflows(cmd: WorkflowsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkflowsCmd::Check { dir } => match Catalog::load_dir(&dir) {
            Ok(c) => {
                for p in c.iter() {
                    println!(
                        "ok  {:<24} {} agent(s)  {}",
                        p.name,
                        p.agents.len(),
                        p.description
                    );
                }
                println!("{} pack(s) valid in {}", c.len(), dir.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

pub fn plugins(cmd: PluginsCmd) -> anyhow::Result<ExitCode> {
    let PluginsCmd::Check { dir } = cmd;
    let checked = mozaiks_plugins::Packs::load_dir(&dir).and_then(|packs| {
        mozaiks_plugins::Access::load(&dir)?;
        let sandbox = mozaiks_plugins::Sandbox::new()?;
        for (name, pack) in &packs.packs {
            sandbox.compile(&pack.module).map_err(|e| {
                mozaiks_plugins::Error::InvalidModule(format!("{name}: {}", e.message()))
            })?;
        }
        Ok(packs)
    });
    match checked {
        Ok(packs) => {
            for (name, p) in &packs.packs {
                let m = &p.manifest;
                println!("ok  {name:<24} {:<10} {}", m.version, m.description);
            }
            println!("{} plugin(s) valid in {}", packs.packs.len(), dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Every generated schema: `(file, text)`.
pub fn generated_schemas() -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = mozaiks_events::schema::all()
        .into_iter()
        .map(|(f, t)| (f.to_string(), t))
        .collect();
    all.push(("workflow-pack.schema.json".into(), mozaiks_packs::schema()));
    all.extend(
        mozaiks_ops::schema::all()
            .into_iter()
            .map(|(f, t)| (f.to_string(), t)),
    );
    all.push((
        "plugin.executed.schema.json".into(),
        mozaiks_plugins::schema(),
    ));
    all
}

pub fn schemas(args: SchemasArgs) -> anyhow::Result<ExitCode> {
    let mut drift = Vec::new();
    for (file, text) in generated_schemas() {
        let path = args.dir.join(&file);
        if args.check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                drift.push(file);
            }
        } else {
            std::fs::create_dir_all(&args.dir)?;
            std::fs::write(&path, text)?;
            println!("wrote {}", path.display());
        }
    }
    if !drift.is_empty() {
        eprintln!(
            "schemas out of date: {} (run `mozaiks schemas`)",
            drift.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
