//! The refusal classifier against our own labelled generations
//! (`tests/data/refusal-labels.jsonl`: greedy 32-token replies of three models to lines of the
//! shipped prompt sets, each labelled `refusal` or `compliance` by a person reading it). Prints
//! the confusion matrix per model and overall; the figures are in `docs/lab/refusal-classifier.md`.

use std::collections::BTreeMap;

use policies::refusal::classify;

/// The least accuracy allowed, overall and per model (measured: see the lab note).
const MIN_ACCURACY: f64 = 0.9;

#[derive(Default, Debug)]
struct Confusion {
    /// (labelled refusal, classified refusal) counts.
    tp: usize,
    fn_: usize,
    fp: usize,
    tn: usize,
}

impl Confusion {
    fn add(&mut self, label: bool, got: bool) {
        match (label, got) {
            (true, true) => self.tp += 1,
            (true, false) => self.fn_ += 1,
            (false, true) => self.fp += 1,
            (false, false) => self.tn += 1,
        }
    }

    fn n(&self) -> usize {
        self.tp + self.fn_ + self.fp + self.tn
    }

    fn accuracy(&self) -> f64 {
        (self.tp + self.tn) as f64 / self.n() as f64
    }
}

#[test]
fn the_classifier_agrees_with_our_labels() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/refusal-labels.jsonl"
    );
    let text = std::fs::read_to_string(path).expect("the labelled set is in the repository");
    let mut by_model: BTreeMap<String, Confusion> = BTreeMap::new();
    let mut all = Confusion::default();
    let mut wrong = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let row: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{path}:{}: {e}", i + 1));
        let field = |k: &str| {
            row[k]
                .as_str()
                .unwrap_or_else(|| panic!("{path}:{}: no string `{k}`", i + 1))
                .to_string()
        };
        let label = match field("label").as_str() {
            "refusal" => true,
            "compliance" => false,
            other => panic!(
                "{path}:{}: label `{other}` is not refusal or compliance",
                i + 1
            ),
        };
        let got = classify(&field("generation")).refused;
        by_model.entry(field("model")).or_default().add(label, got);
        all.add(label, got);
        if label != got {
            wrong.push(format!(
                "{path}:{}: labelled {}: {:?}",
                i + 1,
                field("label"),
                field("generation")
            ));
        }
    }
    println!("model | n | refusal->refusal | refusal->compliance | compliance->refusal | compliance->compliance | accuracy");
    for (m, c) in by_model.iter().chain([(&"all".to_string(), &all)]) {
        println!(
            "{m} | {} | {} | {} | {} | {} | {:.3}",
            c.n(),
            c.tp,
            c.fn_,
            c.fp,
            c.tn,
            c.accuracy()
        );
    }
    for w in &wrong {
        println!("misclassified: {w}");
    }
    assert_eq!(by_model.len(), 3, "the set covers three models");
    assert!(all.tp > 0 && all.tn > 0, "the set has both labels");
    for (m, c) in by_model.iter().chain([(&"all".to_string(), &all)]) {
        assert!(
            c.accuracy() >= MIN_ACCURACY,
            "{m}: accuracy {:.3} below {MIN_ACCURACY}",
            c.accuracy()
        );
    }
}
