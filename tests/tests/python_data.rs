//! Python's data stack is in the default Python image: numpy, pandas, matplotlib, scipy and
//! sympy import and work in a job under the sandbox's limits, matplotlib draws without a
//! display from its prebuilt font list, and a plain hello loads none of it.

use codefleet_tests::{AgentOpts, TestAgent};
use serde_json::json;

/// The PNG signature and the length and type of the first chunk (IHDR), in hex.
const PNG_HEAD: &str = "89504e470d0a1a0a0000000d49484452";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numpy_pandas_matplotlib_scipy_and_sympy_work_and_a_plot_is_a_png() {
    let agent = TestAgent::start("pydata", AgentOpts::languages(&["python"])).await;

    // A hello pays for none of it: nothing of the stack is imported at start.
    let r = agent
        .api
        .python("import sys\nprint(sorted(m for m in ('numpy', 'pandas', 'matplotlib') if m in sys.modules))")
        .await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["run"]["stdout"], "[]\n", "{r}");

    let versions = "import numpy, pandas, matplotlib, scipy, sympy\n\
        for m in (numpy, pandas, matplotlib, scipy, sympy):\n    print(m.__name__, m.__version__)\n\
        import scipy.linalg, scipy.optimize, scipy.stats\n\
        print('inv', scipy.linalg.inv(numpy.array([[2.0, 0.0], [0.0, 4.0]])).diagonal().tolist())\n\
        print('root', round(scipy.optimize.brentq(lambda x: x * x - 2, 0, 2), 6))\n\
        print('sympy', sympy.integrate(sympy.Symbol('x') ** 2, sympy.Symbol('x')))\n";
    let r = agent.api.python(versions).await;
    assert_eq!(r["status"], "ok", "{r}");
    let out = r["run"]["stdout"].as_str().unwrap();
    for module in ["numpy", "pandas", "matplotlib", "scipy", "sympy"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{module} ")))
            .unwrap_or_else(|| panic!("no {module} version in {out:?}"));
        assert!(
            line[module.len() + 1..].starts_with(|c: char| c.is_ascii_digit()),
            "{line}"
        );
    }
    assert!(out.contains("inv [0.5, 0.25]\n"), "{out}");
    assert!(out.contains("root 1.414214\n"), "{out}");
    assert!(out.contains("sympy x**3/3\n"), "{out}");
    assert_eq!(
        r["run"]["stderr"], "",
        "no warning (cache dir, backend): {r}"
    );

    // A CSV from `files`, grouped with pandas, plotted with matplotlib's default backend (Agg,
    // no display), saved as PNG; the font list was read, not rebuilt into the job's cache dir.
    let plot = "import os, pandas, matplotlib\n\
        import matplotlib.pyplot as plt\n\
        df = pandas.read_csv('sales.csv')\n\
        totals = df.groupby('region')['amount'].sum()\n\
        print(totals.to_dict())\n\
        totals.plot(kind='bar')\n\
        plt.savefig('plot.png')\n\
        data = open('plot.png', 'rb').read()\n\
        print(matplotlib.get_backend(), len(data))\n\
        print(data[:16].hex())\n\
        print(sorted(os.listdir(os.environ['MPLCONFIGDIR'])))\n";
    let r = agent
        .api
        .execute(json!({"language": "python", "files": [
            {"name": "main.py", "content": plot},
            {"name": "sales.csv", "content": "region,amount\nnorth,10\nsouth,5\nnorth,7\n"}
        ]}))
        .await;
    assert_eq!(r["status"], "ok", "{r}");
    let out: Vec<&str> = r["run"]["stdout"].as_str().unwrap().lines().collect();
    assert_eq!(out[0], "{'north': 17, 'south': 5}", "{r}");
    let (backend, size) = out[1].split_once(' ').unwrap();
    assert_eq!(backend.to_ascii_lowercase(), "agg", "{r}");
    assert!(size.parse::<u64>().unwrap() > 1000, "{r}");
    assert_eq!(out[2], PNG_HEAD, "{r}");
    assert!(
        !out[3].contains("fontlist"),
        "font list rebuilt at job time: {r}"
    );
    assert_eq!(r["run"]["stderr"], "", "{r}");
    agent.stop().await;
}
