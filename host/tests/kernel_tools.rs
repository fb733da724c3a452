//! `tools/kernel-registers.py`, the check a CUDA kernel gets before it costs device time: its
//! `--digest` must tell an edited kernel from one left as it was, since program.md relies on it
//! to show that a change for long rows leaves the default model's kernels alone.

mod common;

use std::collections::HashMap;

/// Each kernel's code digest as `kernel-registers.py --digest` prints it for `source`.
fn digests(source: &std::path::Path) -> HashMap<String, String> {
    let source = source.as_os_str();
    common::python_script("tools/kernel-registers.py", [source, "--digest".as_ref()])
        .lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(
                fields.len(),
                5,
                "kernel, registers, spills, smem, digest: {line}"
            );
            (fields[0].to_string(), fields[4].to_string())
        })
        .collect()
}

#[test]
#[ignore = "needs libnvrtc (.ci/run fetches it from PyPI into the cache)"]
fn nvrtc_kernel_digests_change_only_for_the_kernel_edited() {
    let dir = common::scratch("kernel-digests");
    let source = |scale: &str| {
        format!(
            "extern \"C\" __global__ void kept(float* x) {{ x[threadIdx.x] *= 2.0f; }}\n\
             extern \"C\" __global__ void edited(float* x) {{ x[threadIdx.x] *= {scale}; }}\n"
        )
    };
    std::fs::write(dir.join("before.cu"), source("3.0f")).unwrap();
    std::fs::write(dir.join("after.cu"), source("5.0f")).unwrap();
    let before = digests(&dir.join("before.cu"));
    let after = digests(&dir.join("after.cu"));
    for d in before.values().chain(after.values()) {
        assert!(
            d.len() == 12 && d.chars().all(|c| c.is_ascii_hexdigit()),
            "{d}"
        );
    }
    assert_eq!(before.len(), 2, "{before:?}");
    assert_eq!(
        before["kept"], after["kept"],
        "an unchanged kernel keeps its digest"
    );
    assert_ne!(
        before["edited"], after["edited"],
        "an edited kernel's digest changes"
    );
    // The same source twice compiles to the same code.
    assert_eq!(digests(&dir.join("before.cu")), before);
}

/// `--against REV` compiles the same source as git has it at REV and says of each kernel
/// whether its code and resources are the same, changed or new (a kernel whose code stays
/// but whose shared memory grows has changed): the one-command check program.md asks for
/// before a change meant for long rows costs device time.
#[test]
#[ignore = "needs libnvrtc (.ci/run fetches it from PyPI into the cache)"]
fn nvrtc_kernel_digests_against_a_revision_name_what_changed() {
    let dir = common::scratch("kernel-digests-against");
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let kernel = |name: &str, scale: &str| {
        format!("extern \"C\" __global__ void {name}(float* x) {{ x[threadIdx.x] *= {scale}; }}\n")
    };
    // The same code over a larger shared array: its digest stays, its shared memory does not.
    let resized = |n: u32| {
        format!(
            "extern \"C\" __global__ void resized(float* x) {{ __shared__ float s[{n}]; \
             s[threadIdx.x % 32] = x[threadIdx.x]; __syncthreads(); \
             x[threadIdx.x] = s[(threadIdx.x + 1) % 32]; }}\n"
        )
    };
    let source = dir.join("kernels.cu");
    std::fs::write(
        &source,
        kernel("kept", "2.0f") + &kernel("edited", "3.0f") + &resized(32),
    )
    .unwrap();
    git(&["init", "-q"]);
    git(&["add", "kernels.cu"]);
    git(&["commit", "-q", "-m", "before"]);
    std::fs::write(
        &source,
        kernel("kept", "2.0f")
            + &kernel("edited", "5.0f")
            + &kernel("added", "7.0f")
            + &resized(64),
    )
    .unwrap();
    let source = source.as_os_str();
    let stdout = common::python_script(
        "tools/kernel-registers.py",
        [source, "--against".as_ref(), "HEAD".as_ref()],
    );
    let verdicts: HashMap<&str, &str> = stdout
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((*fields.first()?, *fields.last()?))
        })
        .collect();
    assert_eq!(verdicts.get("kept"), Some(&"same"), "{stdout}");
    assert_eq!(verdicts.get("edited"), Some(&"changed"), "{stdout}");
    assert_eq!(verdicts.get("added"), Some(&"new"), "{stdout}");
    assert_eq!(verdicts.get("resized"), Some(&"changed"), "{stdout}");
    assert!(
        stdout.lines().next().unwrap_or("").ends_with("vs HEAD"),
        "{stdout}"
    );
}

/// `-D WGMMA` compiles for sm_90a, as the variant does when it passes that macro: warpgroup
/// MMAs exist only there, so a source with one compiles with the macro and is refused, by
/// ptxas naming the target, without it.
#[test]
#[ignore = "needs libnvrtc (.ci/run fetches it from PyPI into the cache)"]
fn nvrtc_kernel_registers_compiles_wgmma_for_sm_90a() {
    let dir = common::scratch("kernel-registers-wgmma");
    let source = dir.join("wgmma.cu");
    std::fs::write(
        &source,
        "extern \"C\" __global__ void fenced(float* x) {\n\
         asm volatile(\"wgmma.fence.sync.aligned;\" ::: \"memory\");\n\
         x[threadIdx.x] *= 2.0f; }\n",
    )
    .unwrap();
    let stdout = common::python_script(
        "tools/kernel-registers.py",
        [source.as_os_str(), "-D".as_ref(), "WGMMA".as_ref()],
    );
    assert!(
        stdout.lines().any(|line| line.starts_with("fenced ")),
        "{stdout}"
    );
    let out = std::process::Command::new("python3")
        .arg(common::root().join("tools/kernel-registers.py"))
        .arg(&source)
        .output()
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("sm_90'"), "{stderr}");
}
