//! `mechwatch sae train | eval | search | top` on the real default model, small sizes.

use e2e::*;

#[test]
fn train_eval_search_top_on_the_default_model() {
    default_model();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    let text = "The baker mixed flour, water and salt, then left the dough to rise overnight.\n\n\
        A train crossed the valley at dawn while the town was still asleep.\n\n\
        Engineers tested the bridge with heavy trucks before it opened to traffic.\n\n\
        The garden needed water after a week without rain, so the children carried buckets.\n\n";
    std::fs::write(&corpus, text.repeat(12)).unwrap();
    let out = tmp.path().join("sae");
    let o = train_small_sae(&corpus, &out, &["--tokens", "4000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("training the SAE: done in "),
        "no progress"
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg["metadata"]["hook_name"], "blocks.10.hook_resid_post");

    let o = mechwatch(&[
        "sae",
        "eval",
        "--sae",
        out.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--tokens",
        "1024",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!((r["l0"].as_f64().unwrap() - 16.0).abs() < 1e-6, "{r}");
    let fvu = r["fvu"].as_f64().unwrap();
    assert!(fvu > 0.0 && fvu < 1.0, "{r}");
    assert!(r["ce_zero_ablation"].as_f64().unwrap() > r["ce_clean"].as_f64().unwrap());

    let pos = tmp.path().join("pos.txt");
    let neg = tmp.path().join("neg.txt");
    std::fs::write(&pos, "Knead the dough and bake the bread.\nThe baker sold warm bread rolls.\nMix flour and yeast for the loaf.\n").unwrap();
    std::fs::write(&neg, "The train crossed the valley.\nTrucks drove over the new bridge.\nThe station was quiet at dawn.\n").unwrap();
    let labels = tmp.path().join("labels.jsonl");
    let o = mechwatch(&[
        "sae",
        "search",
        "--sae",
        out.to_str().unwrap(),
        "--positive",
        pos.to_str().unwrap(),
        "--negative",
        neg.to_str().unwrap(),
        "--top",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ranked: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let best = &ranked[0];
    assert_eq!(best["auroc"].as_f64().unwrap(), 1.0, "{ranked}");
    let idx = best["index"].as_u64().unwrap();
    std::fs::write(&labels, format!("{{\"modelId\": \"smollm2\", \"layer\": \"10\", \"index\": \"{idx}\", \"description\": \"baking\"}}\n")).unwrap();
    let o = mechwatch(&[
        "sae",
        "top",
        "--sae",
        out.to_str().unwrap(),
        "--latent",
        &idx.to_string(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--n",
        "3",
        "--labels",
        labels.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("\"baking\"") && stdout(&o).contains("[["),
        "{}",
        stdout(&o)
    );

    // Bad input: an empty corpus, k above the latent count, an SAE that does not fit.
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let o = mechwatch(&[
        "sae",
        "train",
        "--hook",
        "blocks.10.hook_resid_post",
        "--corpus",
        empty.to_str().unwrap(),
        "--latents",
        "1152",
        "--k",
        "16",
        "--tokens",
        "100",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("empty.txt") && stderr(&o).contains("empty"),
        "{}",
        stderr(&o)
    );
    let o = mechwatch(&[
        "sae",
        "train",
        "--hook",
        "blocks.10.hook_resid_post",
        "--corpus",
        corpus.to_str().unwrap(),
        "--latents",
        "1152",
        "--k",
        "2000",
        "--tokens",
        "100",
        "--out",
        tmp.path().join("y").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("`k`"), "{}", stderr(&o));
    let o = mechwatch(&[
        "sae",
        "eval",
        "--sae",
        out.to_str().unwrap(),
        "--hook",
        "blocks.3.hook_resid_post",
        "--corpus",
        corpus.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("trained on"), "{}", stderr(&o));
    let o = mechwatch(&[
        "sae",
        "top",
        "--sae",
        out.to_str().unwrap(),
        "--latent",
        "99999",
        "--corpus",
        corpus.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("out of range"), "{}", stderr(&o));
}

/// The shipped default SAE on held-out text we wrote. The bars are what the policies rely on:
/// L0 at the recipe's k, splicing it in keeps at least 90% of the model's next-token loss, and
/// FVU at most 0.15 (docs/lab/default-sae.md has the measured figures).
#[test]
fn the_shipped_default_sae_meets_its_quality_bars_on_held_out_text() {
    default_model();
    let o = mechwatch(&["sae", "default", "--eval"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let dir = std::path::Path::new(out.lines().next().expect("the SAE's folder").trim());
    let name = dir.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("shipped-"), "not the shipped SAE: {out}");
    assert!(dir.join("sae_weights.safetensors").exists(), "{out}");
    assert!(!dir.join("checkpoint.safetensors").exists(), "{out}");
    assert!(!dir.join("checkpoint.json").exists(), "{out}");
    let report = &out[out.find('{').expect("an eval report")..];
    let r: serde_json::Value = serde_json::from_str(report).unwrap();
    assert!(r["tokens"].as_u64().unwrap() > 500, "{r}");
    assert!((r["l0"].as_f64().unwrap() - 32.0).abs() < 0.5, "{r}");
    assert!(r["ce_loss_recovered"].as_f64().unwrap() >= 0.90, "{r}");
    assert_eq!(r["hook"], "blocks.11.hook_resid_post", "{r}");
    assert!(r["fvu"].as_f64().unwrap() <= 0.15, "{r}");
}

/// The shipped SAE is the recipe's: a recipe change without new shipped files fails here.
#[test]
fn the_shipped_sae_matches_the_recipe() {
    default_model();
    let o = mechwatch(&["sae", "default", "--recipe"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let recipe: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let shipped_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../probes/data/default-sae/recipe.json");
    let shipped: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shipped_path).unwrap()).unwrap();
    assert_eq!(
        recipe, shipped,
        "the recipe changed: retrain with `mechwatch sae default --retrain` and ship its f16 \
         copy in probes/data/default-sae/"
    );
}

/// `--sparsity batchtopk` trains on the real model and saves a SAELens `jumprelu` SAE that
/// `sae eval` loads, with about `k` latents active per token.
#[test]
fn batchtopk_training_saves_a_jumprelu_sae_that_evaluates() {
    default_model();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    let text = "Rain fell on the tin roof of the workshop all afternoon.\n\n\
        The carpenter measured the board twice before he cut it.\n\n\
        A ferry carried cars and bicycles across the narrow strait.\n\n\
        Her grandmother kept seeds from the best tomatoes every summer.\n\n";
    std::fs::write(&corpus, text.repeat(12)).unwrap();
    let out = tmp.path().join("sae");
    let out_s = out.to_str().unwrap();
    let o = train_small_batchtopk_sae(&corpus, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg["architecture"], "jumprelu", "{cfg}");
    assert_eq!(cfg["metadata"]["trained_k"], 16, "{cfg}");

    let corpus_s = corpus.to_str().unwrap();
    let args = ["sae", "eval", "--sae", out_s, "--corpus", corpus_s];
    let o = mechwatch(&[&args[..], &["--tokens", "1024", "--json"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let l0 = r["l0"].as_f64().unwrap();
    assert!(
        (8.0..=32.0).contains(&l0),
        "L0 {l0} is far from k = 16: {r}"
    );
    let fvu = r["fvu"].as_f64().unwrap();
    assert!(fvu > 0.0 && fvu < 1.0, "{r}");
}

/// `sae prune` removes what older recipes left for this model, and keeps this recipe's SAE
/// and corpus and every folder made for another model.
#[test]
fn prune_removes_only_what_older_recipes_left_for_this_model() {
    let model = default_model();
    let model = model.to_str().unwrap();
    // This recipe's folder and recipe, as `sae default --retrain` would write them.
    let o = mechwatch(&["sae", "default", "--model", model, "--recipe-dir"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let current = std::path::PathBuf::from(stdout(&o).trim());
    let o = mechwatch(&["sae", "default", "--model", model, "--recipe"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let current_recipe = stdout(&o).into_bytes();

    let home = tempfile::tempdir().unwrap();
    let in_home = |args: &[&str]| {
        std::process::Command::new(mechwatch_bin())
            .args(args)
            .env("MECHWATCH_HOME", home.path())
            .output()
            .unwrap()
    };
    let o = in_home(&["sae", "default", "--model", model, "--corpus-dir"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let current_corpus = std::path::PathBuf::from(stdout(&o).trim());
    let sae = home.path().join("sae");
    let folder = |name: &str, recipe: Option<&[u8]>| {
        let dir = sae.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("weights"), vec![0u8; 1000]).unwrap();
        if let Some(r) = recipe {
            std::fs::write(dir.join("recipe.json"), r).unwrap();
        }
        dir
    };
    let mut older: serde_json::Value = serde_json::from_slice(&current_recipe).unwrap();
    older["train"]["hook"] = "blocks.15.hook_resid_post".into();
    let mut other_model = older.clone();
    other_model["model_digest"] = "0".repeat(64).into();
    let this_recipe = folder(
        current.file_name().unwrap().to_str().unwrap(),
        Some(&current_recipe),
    );
    let this_corpus = folder(current_corpus.file_name().unwrap().to_str().unwrap(), None);
    let stale_sae = folder(
        "default-0000000000000001",
        Some(older.to_string().as_bytes()),
    );
    let stale_corpus = folder("corpus-0000000000000002", None);
    let other = folder(
        "default-0000000000000003",
        Some(other_model.to_string().as_bytes()),
    );

    let dry = in_home(&["sae", "prune", "--model", model, "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let listed = stdout(&dry);
    assert!(listed.contains("would remove 2 folders"), "{listed}");
    for dir in [&stale_sae, &stale_corpus] {
        assert!(listed.contains(dir.to_str().unwrap()), "{listed}");
        assert!(dir.exists(), "a dry run removed {}", dir.display());
    }

    let o = in_home(&["sae", "prune", "--model", model]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("removed 2 folders"), "{}", stdout(&o));
    assert!(!stale_sae.exists() && !stale_corpus.exists());
    for kept in [&this_recipe, &this_corpus, &other] {
        assert!(kept.exists(), "{} was removed", kept.display());
    }
    // Nothing left to remove.
    let again = in_home(&["sae", "prune", "--model", model]);
    assert!(
        stdout(&again).contains("removed 0 folders"),
        "{}",
        stdout(&again)
    );
}
