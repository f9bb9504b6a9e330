;; todo: a per-user to-do list, the example plugin of the README's "Writing a plugin".
;;
;; POST /api/execute/todo {"item": "buy milk"}  adds an item, notifies the user, answers the list
;; POST /api/execute/todo {}                    answers {"items": [...]}
;;
;; The list lives in the host's key-value store under the key "items" in scope 0, which the host
;; scopes to (this app, this plugin, the calling user): another user or app never sees it.
;; The input is the server's compact JSON with sorted keys, so finding "item":" is enough here
;; (a real plugin would link a JSON parser).
;;
;; Memory: constants below 1 KiB, the input at 64 KiB, the list at 384 KiB, output at 448 KiB.
(module
  (import "mozaiks" "input_len" (func $input_len (result i32)))
  (import "mozaiks" "input_read" (func $input_read (param i32)))
  (import "mozaiks" "output" (func $output (param i32 i32)))
  (import "mozaiks" "error" (func $error (param i32 i32)))
  (import "mozaiks" "result_read" (func $result_read (param i32)))
  (import "mozaiks" "kv_get" (func $kv_get (param i32 i32 i32) (result i32)))
  (import "mozaiks" "kv_set" (func $kv_set (param i32 i32 i32 i32 i32) (result i32)))
  (import "mozaiks" "notify" (func $notify (param i32 i32) (result i32)))
  (memory (export "memory") 10)

  (data (i32.const 0) "items")
  (data (i32.const 16) "\"item\":\"")
  (data (i32.const 32) "{\"items\":")
  (data (i32.const 44) ",\"]}")
  (data (i32.const 48) "[]")
  (data (i32.const 64) "{\"data\":{\"added\":\"")
  (data (i32.const 96) "\"}}")
  (data (i32.const 112) "{\"code\":\"too_large\",\"message\":\"the input or the item is too large\"}")
  (data (i32.const 256) "{\"code\":\"bad_item\",\"message\":\"item must be a non-empty string\"}")
  (data (i32.const 384) "{\"code\":\"unavailable\",\"message\":\"the store did not answer\"}")

  (global $out (mut i32) (i32.const 458752))

  ;; The index of needle in haystack, or -1.
  (func $find (param $h i32) (param $hl i32) (param $n i32) (param $nl i32) (result i32)
    (local $i i32) (local $j i32)
    (block $none
      (loop $outer
        (br_if $none (i32.gt_s (i32.add (local.get $i) (local.get $nl)) (local.get $hl)))
        (local.set $j (i32.const 0))
        (block $miss
          (loop $inner
            (if (i32.ge_u (local.get $j) (local.get $nl)) (then (return (local.get $i))))
            (br_if $miss
              (i32.ne
                (i32.load8_u (i32.add (local.get $h) (i32.add (local.get $i) (local.get $j))))
                (i32.load8_u (i32.add (local.get $n) (local.get $j)))))
            (local.set $j (i32.add (local.get $j) (i32.const 1)))
            (br $inner)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $outer)))
    (i32.const -1))

  ;; The address of the quote that closes the JSON string starting at p, or -1.
  (func $string_end (param $p i32) (param $end i32) (result i32)
    (block $none
      (loop $l
        (br_if $none (i32.ge_u (local.get $p) (local.get $end)))
        (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 92))
          (then
            (local.set $p (i32.add (local.get $p) (i32.const 2)))
            (br $l)))
        (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 34))
          (then (return (local.get $p))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $l)))
    (i32.const -1))

  ;; Appends len bytes at p to the output buffer.
  (func $emit (param $p i32) (param $len i32)
    (memory.copy (global.get $out) (local.get $p) (local.get $len))
    (global.set $out (i32.add (global.get $out) (local.get $len))))

  (func (export "run") (result i32)
    (local $len i32) (local $at i32) (local $item i32) (local $item_end i32)
    (local $ilen i32) (local $slen i32)
    (local.set $len (call $input_len))
    (if (i32.gt_u (local.get $len) (i32.const 327680))
      (then (call $error (i32.const 112) (i32.const 67)) (return (i32.const 1))))
    (call $input_read (i32.const 65536))
    ;; The stored list, or [].
    (local.set $slen (call $kv_get (i32.const 0) (i32.const 0) (i32.const 5)))
    (if (i32.eq (local.get $slen) (i32.const -1))
      (then
        (memory.copy (i32.const 393216) (i32.const 48) (i32.const 2))
        (local.set $slen (i32.const 2)))
      (else
        (if (i32.lt_s (local.get $slen) (i32.const 0))
          (then (call $error (i32.const 384) (i32.const 59)) (return (i32.const 1))))
        (call $result_read (i32.const 393216))))
    (local.set $at (call $find (i32.const 65536) (local.get $len) (i32.const 16) (i32.const 8)))
    (if (i32.ge_s (local.get $at) (i32.const 0))
      (then
        (local.set $item (i32.add (i32.const 65536) (i32.add (local.get $at) (i32.const 8))))
        (local.set $item_end
          (call $string_end (local.get $item) (i32.add (i32.const 65536) (local.get $len))))
        (local.set $ilen (i32.sub (local.get $item_end) (local.get $item)))
        (if (i32.or (i32.lt_s (local.get $item_end) (i32.const 0)) (i32.le_s (local.get $ilen) (i32.const 0)))
          (then (call $error (i32.const 256) (i32.const 63)) (return (i32.const 1))))
        (if (i32.gt_u (i32.add (local.get $slen) (local.get $ilen)) (i32.const 65000))
          (then (call $error (i32.const 112) (i32.const 67)) (return (i32.const 1))))
        ;; The new list: the old one without its "]", a comma unless it was empty, "item"].
        (global.set $out (i32.const 458752))
        (call $emit (i32.const 393216) (i32.sub (local.get $slen) (i32.const 1)))
        (if (i32.gt_u (local.get $slen) (i32.const 2))
          (then (call $emit (i32.const 44) (i32.const 1))))
        (call $emit (i32.const 45) (i32.const 1))
        (call $emit (local.get $item) (local.get $ilen))
        (call $emit (i32.const 45) (i32.const 2))
        (local.set $slen (i32.sub (global.get $out) (i32.const 458752)))
        (memory.copy (i32.const 393216) (i32.const 458752) (local.get $slen))
        (if (call $kv_set (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 393216) (local.get $slen))
          (then (call $error (i32.const 384) (i32.const 59)) (return (i32.const 1))))
        ;; Tell the user: {"data":{"added":"<item>"}}.
        (global.set $out (i32.const 458752))
        (call $emit (i32.const 64) (i32.const 18))
        (call $emit (local.get $item) (local.get $ilen))
        (call $emit (i32.const 96) (i32.const 3))
        (drop (call $notify (i32.const 458752) (i32.sub (global.get $out) (i32.const 458752))))))
    ;; The answer: {"items": <list>}.
    (global.set $out (i32.const 458752))
    (call $emit (i32.const 32) (i32.const 9))
    (call $emit (i32.const 393216) (local.get $slen))
    (call $emit (i32.const 47) (i32.const 1))
    (call $output (i32.const 458752) (i32.sub (global.get $out) (i32.const 458752)))
    (i32.const 0)))
