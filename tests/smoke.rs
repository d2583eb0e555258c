use candle_core::{DType, Device, Tensor};
use segattn::{reference, SegmentAttention, SegmentMask};

#[test]
fn smoke() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (2, 150, 4, 64), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (2, 150, 2, 64), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (2, 150, 2, 64), &dev)?;
    for mask in [SegmentMask::causal(150, &dev)?, SegmentMask::pine(10, &[50, 40, 30], 20, &dev)?, SegmentMask::documents(&[&[100, 50], &[1, 149]], &dev)?] {
        let r = SegmentAttention::new(&mask).return_lse(true).forward(&q, &k, &v)?;
        let want = reference::attention(&q, &k, &v, &mask, None)?;
        let e = (r.out.to_dtype(DType::F64)? - &want.out)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let el = (r.lse.unwrap().to_dtype(DType::F64)? - &want.lse)?.abs()?.max_all()?.to_scalar::<f64>()?;
        println!("err {e} lse {el}");
        assert!(e < 1e-4 && el < 1e-4);
    }
    Ok(())
}
