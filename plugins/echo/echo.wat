;; echo: answers its input as the plugin sees it, the server's `_context` included.
;; The smallest useful plugin, and the one the benchmark calls.
(module
  (import "mozaiks" "input_len" (func $input_len (result i32)))
  (import "mozaiks" "input_read" (func $input_read (param i32)))
  (import "mozaiks" "output" (func $output (param i32 i32)))
  (memory (export "memory") 5)
  (func (export "run") (result i32)
    (local $len i32)
    (local.set $len (call $input_len))
    (if (i32.gt_u (local.get $len) (i32.const 327680)) (then (return (i32.const 1))))
    (call $input_read (i32.const 0))
    (call $output (i32.const 0) (local.get $len))
    (i32.const 0)))
