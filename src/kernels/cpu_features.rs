//! What the CPU offers the hand-written kernels, probed once per process.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, Default)]
pub struct CpuFeatures {
    /// AVX2 and FMA: the 8-lane panel kernels (`matmul/avx2.rs`) on CPUs without AVX-512.
    pub avx2_fma: bool,
    /// AVX-512F: the vectorised loops and the float32 panel kernel.
    pub avx512: bool,
    /// AVX-512 BF16 (+BW): the `vdpbf16ps` bfloat16 panel kernel.
    pub avx512_bf16: bool,
    /// AVX-512 VNNI (+BW): the int8 panel kernel (`vpdpwssd`).
    pub avx512_vnni: bool,
    /// AMX-BF16 tiles, with the kernel's permission to use them granted to this process.
    pub amx_bf16: bool,
}

/// The instruction sets the kernels may use: what the CPU has, capped by
/// `EXITSERVE_MAX_ISA` (`avx2`: no AVX-512 or AMX; `avx512`: no AMX), so that every path a
/// CPU has can be run and compared on it (as PyTorch's `ATEN_CPU_CAPABILITY` does).
pub fn get() -> CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    *FEATURES.get_or_init(|| capped(probe(), std::env::var("EXITSERVE_MAX_ISA").ok().as_deref()))
}

/// `cpu` without the instruction sets above `max` (None or an unknown name: all of them).
fn capped(cpu: CpuFeatures, max: Option<&str>) -> CpuFeatures {
    match max {
        Some("avx2") => CpuFeatures {
            avx2_fma: cpu.avx2_fma,
            ..CpuFeatures::default()
        },
        Some("avx512") => CpuFeatures {
            amx_bf16: false,
            ..cpu
        },
        _ => cpu,
    }
}

#[cfg(target_arch = "x86_64")]
fn probe() -> CpuFeatures {
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    let avx512_bf16 = avx512
        && std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512bw");
    let avx512_vnni = avx512
        && std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx512bw");
    CpuFeatures {
        avx2_fma: std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"),
        avx512,
        avx512_bf16,
        avx512_vnni,
        amx_bf16: amx_bf16(),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn probe() -> CpuFeatures {
    CpuFeatures::default()
}

/// AMX-BF16 per CPUID, and Linux's permission to use the tile data (which it grants per
/// process, on request, because the tile state makes every context switch save 8 KiB more).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_bf16() -> bool {
    // CPUID.(EAX=7, ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    use std::arch::x86_64::{__cpuid_count, __get_cpuid_max};
    if __get_cpuid_max(0).0 < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's XSAVE permissions.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn amx_bf16() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_removes_what_lies_above_it() {
        let all = CpuFeatures {
            avx2_fma: true,
            avx512: true,
            avx512_bf16: true,
            avx512_vnni: true,
            amx_bf16: true,
        };
        let avx2 = capped(all, Some("avx2"));
        assert!(avx2.avx2_fma && !avx2.avx512 && !avx2.avx512_bf16 && !avx2.avx512_vnni);
        assert!(!avx2.amx_bf16);
        let avx512 = capped(all, Some("avx512"));
        assert!(avx512.avx512_bf16 && avx512.avx512_vnni && !avx512.amx_bf16);
        assert!(capped(all, None).amx_bf16 && capped(all, Some("any")).amx_bf16);
    }
}
